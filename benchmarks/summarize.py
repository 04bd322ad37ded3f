"""Markdown summary of a pytest-benchmark JSON from benchmarks/bench_*.py: one row per (case, provider)
with the median, the speed-up over eager and over torch.compile measured side by side in that run, GB/s
over the case's minimal bytes (extra_info "bytes"), kernel launches where recorded, and % of the copy
bandwidth when --copy-json (benchmarks/copy_bandwidth.py) is given. Cases are the benchmarks' groups.

    python benchmarks/summarize.py results.json [--copy-json copy_bandwidth.json]
"""
import argparse
import json
from collections import OrderedDict


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--copy-json")
    args = ap.parse_args()
    data = json.load(open(args.json))
    copy = json.load(open(args.copy_json))["copy_GBps"] if args.copy_json else None
    cases = OrderedDict()
    for b in data["benchmarks"]:
        info = b["extra_info"]
        cases.setdefault(b["group"] or b["name"].split("[")[0], OrderedDict())[info["provider"]] = (
            b["stats"]["median"], info.get("bytes"), info.get("launches"))
    m = data.get("machine_info", {})
    print("machine: %s, %s; python %s; commit %s; %s" % (
        m.get("node", "?"), m.get("cpu", {}).get("brand_raw", "?"), m.get("python_version", "?"),
        data.get("commit_info", {}).get("id", "?")[:10], data.get("datetime", "?")))
    print()
    head = "| case | provider | median ms | vs eager | vs compile | GB/s | launches |"
    print(head + (" % copy BW |" if copy else ""))
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|" if copy else ""))
    for case, provs in cases.items():
        eager = provs.get("eager", (None,))[0]
        comp = provs.get("compile", (None,))[0]
        for prov, (med, nbytes, launches) in provs.items():
            gbs = nbytes / med / 1e9 if nbytes else None
            row = "| %s | %s | %.3f | %s | %s | %s | %s |" % (
                case, prov, med * 1e3, "%.2f×" % (eager / med) if eager else "–",
                "%.2f×" % (comp / med) if comp else "–", "%.1f" % gbs if gbs else "–",
                launches if launches is not None else "–")
            if copy:
                row += " %s |" % ("%.0f%%" % (100 * gbs / copy) if gbs else "–")
            print(row)


if __name__ == "__main__":
    main()
