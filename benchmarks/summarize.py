"""Markdown summary of a pytest-benchmark JSON from benchmarks/bench_*.py: one row per case with each
provider's median, the fused providers' speed-up over eager and torch.compile (measured side by side
in that run), GB/s over the minimal bytes, and % of the copy bandwidth when --copy-json is given.

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
        p = b["params"]
        info = b["extra_info"]
        key = (b["name"].split("[")[0], p.get("pass_", ""),
               " ".join("%s=%s" % (k, info[k]) for k in ("M", "T", "B", "D") if k in info), info.get("dtype", ""))
        cases.setdefault(key, {})[info["provider"]] = (b["stats"]["median"], info["bytes"])
    m = data.get("machine_info", {})
    print("machine: %s, %s; python %s; commit %s" % (m.get("node", "?"), m.get("cpu", {}).get("brand_raw", "?"),
                                                     m.get("python_version", "?"),
                                                     data.get("commit_info", {}).get("id", "?")[:10]))
    print()
    print("| case | pass | shape | dtype | provider | median ms | vs eager | vs compile | GB/s |%s" %
          (" % copy BW |" if copy else ""))
    print("|---|---|---|---|---|---:|---:|---:|---:|%s" % ("---:|" if copy else ""))
    for (name, pass_, shape, dtype), provs in cases.items():
        eager = provs.get("eager", (None,))[0]
        comp = provs.get("compile", (None,))[0]
        for prov, (med, nbytes) in provs.items():
            gbs = nbytes / med / 1e9
            row = "| %s | %s | %s | %s | %s | %.3f | %s | %s | %.1f |" % (
                name.replace("test_", ""), pass_, shape, dtype.replace("torch.", ""), prov, med * 1e3,
                "%.2f×" % (eager / med) if eager else "–", "%.2f×" % (comp / med) if comp else "–", gbs)
            if copy:
                row += " %.0f%% |" % (100 * gbs / copy)
            print(row)


if __name__ == "__main__":
    main()
