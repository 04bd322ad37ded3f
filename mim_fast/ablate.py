"""``mim-fast ablate``: the ablation table of the UPN and the KGS routing on the synthetic data, where the
impure steps are known.

Rows: no UPN (k_m = u_m) / the UPN with MIM's published settings / the UPN with the demo's settings
(ours), each × KGS off (no intra/inter transfer) / batch routing (the released code) / per-sample
routing (the paper). Every cell trains the ``demo`` preset with only its row's and column's fields
changed, for each seed, and reports the test metrics of the selected epoch (lowest dev L1): MAE and Corr
on all samples, Acc-2 non-0 (MAG-BERT's rule), and the fraction of impure / clean test steps whose
evaluation gate is closed (mean over the three modalities; per modality in the JSON). Mean ± sample
standard deviation (ddof 1) over the seeds.

Runs accumulate in ``OUT/runs.jsonl`` (an interrupted table resumes where it stopped); the table is written
to ``OUT/ablation.md``, ``OUT/ablation.json`` and ``OUT/ablation.png``.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence

from . import train as train_lib

# The UPN's own settings: what "published" takes from the mim preset (everything else is the demo's)
UPN_FIELDS = ("penalty_weight", "penalty_scale", "penalty_warmup", "gate_penalty", "loc_bias", "mask_ratio",
              "mask_score_bias", "mask_score_relu", "mask_residual", "pool_norm")
UPN_ROWS = {
    "none": {"upn": False},
    "published": {k: train_lib.PRESETS["mim"][k] for k in UPN_FIELDS},
    "ours": {},  # the demo preset's UPN
}
KGS_COLUMNS = {"off": {"kgs_transfer": False}, "batch": {"per_sample": False}, "per-sample": {"per_sample": True}}
ROW_NAMES = {"none": "no UPN", "published": "UPN (published settings)", "ours": "UPN (ours)"}
KGS_NAMES = {"off": "KGS off", "batch": "batch routing", "per-sample": "per-sample routing"}
# A tiny version for a smoke test of the command (seconds, not a result)
SMOKE = dict(synthetic={**train_lib.DEMO_SYNTHETIC, "n_train": 64, "n_dev": 16, "n_test": 16, "T": 8,
                        "dims": [8, 6, 5]}, d_model=10, heads=2, batch_size=16)


def cell_config(upn: str, kgs: str, seed: int, epochs: Optional[int], out: str, extra: Optional[dict] = None):
    """The TrainConfig of one cell and seed: the demo preset with the row's and the column's fields."""
    kw = {**UPN_ROWS[upn], **KGS_COLUMNS[kgs], **(extra or {})}
    if epochs is not None:
        kw["epochs"] = epochs
    return train_lib.TrainConfig(data="synthetic", preset="demo", out=out, seed=seed, **kw)


def run_cell(upn: str, kgs: str, seed: int, epochs: Optional[int], extra: Optional[dict] = None) -> dict:
    """Train one cell for one seed; the selected epoch's test metrics and gate closure."""
    with tempfile.TemporaryDirectory() as out:
        cfg = cell_config(upn, kgs, seed, epochs, out, extra)
        t0 = time.time()
        result = train_lib.run(cfg, progress=False, log=lambda *a: None)
        seconds = time.time() - t0
    best = result["best"]
    test = best["test"]
    closed = {m: [v["closed_impure"], v["closed_clean"]] for m, v in test["purification"].items()}
    return {"upn": upn, "kgs": kgs, "seed": seed, "epochs": cfg.epochs, "best_epoch": best["epoch"],
            "seconds": seconds, "mae": test["mae_all"], "corr": test["corr_all"], "acc2": test["acc2_non0"],
            "closed_impure": sum(v[0] for v in closed.values()) / len(closed),
            "closed_clean": sum(v[1] for v in closed.values()) / len(closed), "closed": closed,
            "config": {k: v for k, v in cfg.overrides().items()}}


def _mean_std(values: Sequence[float]):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


COLUMNS = (("mae", "test MAE"), ("corr", "Corr"), ("acc2", "Acc-2"), ("closed_impure", "impure closed"),
           ("closed_clean", "clean closed"))


def summarize(runs: List[dict]) -> List[dict]:
    """One row per (UPN, KGS) cell present in ``runs``: mean and std of every column, per modality too."""
    rows = []
    for upn in UPN_ROWS:
        for kgs in KGS_COLUMNS:
            rs = sorted((r for r in runs if r["upn"] == upn and r["kgs"] == kgs), key=lambda r: r["seed"])
            if not rs:
                continue
            row = {"upn": upn, "kgs": kgs, "seeds": [r["seed"] for r in rs], "epochs": rs[0]["epochs"]}
            for key, _ in COLUMNS:
                row[key] = _mean_std([r[key] for r in rs])
            row["per_modality"] = {m: {"closed_impure": _mean_std([r["closed"][m][0] for r in rs]),
                                       "closed_clean": _mean_std([r["closed"][m][1] for r in rs])}
                                   for m in rs[0]["closed"]}
            rows.append(row)
    return rows


def markdown(rows: List[dict]) -> str:
    """The table: mean ± std per column; a second table gives the gate columns per modality."""
    lines = ["| UPN | KGS | " + " | ".join(h for _, h in COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = ["%.3f ± %.3f" % r[k] for k, _ in COLUMNS]
        lines.append("| %s | %s | %s |" % (ROW_NAMES[r["upn"]], KGS_NAMES[r["kgs"]], " | ".join(cells)))
    if rows:
        mods = list(rows[0]["per_modality"])
        lines += ["", "| UPN | KGS | " + " | ".join("%s impure / clean closed" % m for m in mods) + " |",
                  "|---|---|" + "---|" * len(mods)]
        for r in rows:
            lines.append("| %s | %s | %s |" % (ROW_NAMES[r["upn"]], KGS_NAMES[r["kgs"]], " | ".join(
                "%.2f / %.2f" % (r["per_modality"][m]["closed_impure"][0], r["per_modality"][m]["closed_clean"][0])
                for m in mods)))
    return "\n".join(lines)


def plot(rows: List[dict], path: str) -> bool:
    """Grouped bars (KGS on the x axis, one bar per UPN row, ± std): test MAE, Acc-2, impure and clean steps
    closed. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = (("mae", "test MAE (lower is better)"), ("acc2", "test Acc-2 non-0 (higher is better)"),
              ("closed_impure", "impure steps closed (higher is better)"),
              ("closed_clean", "clean steps closed (lower is better)"))
    kgs = [k for k in KGS_COLUMNS if any(r["kgs"] == k for r in rows)]
    upns = [u for u in UPN_ROWS if any(r["upn"] == u for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    width = 0.8 / max(len(upns), 1)
    for ax, (key, title) in zip(axes, panels):
        for j, upn in enumerate(upns):
            cells = [next((r for r in rows if r["upn"] == upn and r["kgs"] == k), None) for k in kgs]
            xs = [i + (j - (len(upns) - 1) / 2) * width for i in range(len(kgs))]
            ax.bar(xs, [c[key][0] if c else 0 for c in cells], width, yerr=[c[key][1] if c else 0 for c in cells],
                   capsize=3, label=ROW_NAMES[upn])
        ax.set_xticks(range(len(kgs)))
        ax.set_xticklabels([KGS_NAMES[k] for k in kgs], fontsize=8)
        ax.set_title(title, fontsize=9)
        if key != "mae":
            ax.set_ylim(0, 1.02)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(upns), fontsize=8, frameon=False)
    seeds = sorted({s for r in rows for s in r["seeds"]})
    fig.suptitle("Synthetic data, %d epochs, mean ± std over seeds %s (gates: mean of the three modalities)"
                 % (rows[0]["epochs"], ", ".join(map(str, seeds))), fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _load(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ablate(out: str, seeds: Sequence[int], *, epochs: Optional[int] = None, upns: Sequence[str] = tuple(UPN_ROWS),
           kgs: Sequence[str] = tuple(KGS_COLUMNS), extra: Optional[dict] = None, log=print) -> List[dict]:
    """Run every missing (UPN, KGS, seed) cell into ``out``/runs.jsonl, then write the table and plot."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "runs.jsonl")
    done = {(r["upn"], r["kgs"], r["seed"]) for r in _load(path)}
    for seed in seeds:  # seed-major: a partial table already has every cell for the first seeds
        for upn in upns:
            for k in kgs:
                if (upn, k, seed) in done:
                    continue
                r = run_cell(upn, k, seed, epochs, extra)
                with open(path, "a") as f:
                    f.write(json.dumps(r) + "\n")
                log("%-10s %-10s seed %d: %5.0fs, epoch %2d, MAE %.4f, closed impure/clean %.2f/%.2f" % (
                    upn, k, seed, r["seconds"], r["best_epoch"], r["mae"], r["closed_impure"], r["closed_clean"]))
    runs = [r for r in _load(path) if r["upn"] in upns and r["kgs"] in kgs and r["seed"] in seeds]
    rows = summarize(runs)
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump({"seeds": list(seeds), "epochs": epochs, "extra": extra, "rows": rows}, f, indent=1)
    table = markdown(rows)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(table + "\n")
    if not plot(rows, os.path.join(out, "ablation.png")):
        log("(matplotlib not installed: no plot)")
    log(table)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/ablation", help="folder for runs.jsonl, ablation.md/.json/.png")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the demo preset's)")
    parser.add_argument("--upn", nargs="+", choices=list(UPN_ROWS), default=list(UPN_ROWS))
    parser.add_argument("--kgs", nargs="+", choices=list(KGS_COLUMNS), default=list(KGS_COLUMNS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: runs are small)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and data set: checks the command only")


def main(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    ablate(args.out, args.seeds, epochs=args.epochs, upns=args.upn, kgs=args.kgs,
           extra=SMOKE if args.smoke else None)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m mim_fast.ablate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
