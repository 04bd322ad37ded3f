"""The experiments behind the demo's purification network (issue 14, item 3): which choices make the UPN's
gates close the impure steps of the synthetic data and keep the clean ones.

Every candidate is a set of TrainConfig overrides on the synthetic demo data (``DEMO_SYNTHETIC``: one
impure stretch per sample carrying a marker; 30 % of the steps impure in every modality). Each run trains
with one thread and records, per epoch, the test MAE and the fraction of impure / clean test steps whose
(evaluation) gate is closed, and the epoch the run selects (lowest dev L1). The target: mean over 3
seeds, every modality, >= 80 % of impure steps closed and <= 10 % of clean steps closed, with a test MAE
no worse than the same model without the UPN.

    python benchmarks/upn_purification.py --list
    python benchmarks/upn_purification.py --candidates open_pw1 open_pw03 --seeds 0 1 2
    python benchmarks/upn_purification.py --report              # the table of everything recorded

Results accumulate in benchmarks/results/upn-purification/runs.jsonl (one line per (candidate, seed);
a pair already there is skipped, so an interrupted sweep resumes) and the report in report.md. The
candidates are kept as they were run, failures included: CANDIDATES' comments say what each tested.
"""
import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results", "upn-purification")

# The demo as it was before this investigation (penalty 1.0, mask_ratio 1, score bias 0.1, pooling over T)
OLD_DEMO = dict(preset="demo", pool_norm="T", penalty_weight=1.0, penalty_scale="none", mask_ratio=1,
                mask_score_bias=0.1, loc_bias=3.0, gate_penalty="mim")
# MIM's UPN settings (the `mim` preset's) inside the demo's training budget
MIM_UPN = dict(OLD_DEMO, penalty_weight=0.1, mask_ratio=5, mask_score_bias="pytorch")

# The mask learner with a linear score and a skip connection around its time MLP (logits depend on the step)
RESID = dict(OLD_DEMO, mask_score_relu=False, mask_residual=True)

CANDIDATES = {
    "no_upn": dict(preset="demo", upn=False),                 # the reference MAE: no purification at all
    "mim_upn": MIM_UPN,                                       # MIM's UPN settings: gates expected never to close
    "old_demo": OLD_DEMO,                                     # the demo before: partial separation
    # pooling over the open steps: no common push to open every gate
    "open_pw1": dict(OLD_DEMO, pool_norm="open"),
    "open_pw03": dict(OLD_DEMO, pool_norm="open", penalty_weight=0.3),
    "open_pw01": dict(OLD_DEMO, pool_norm="open", penalty_weight=0.1),
    "open_pw3": dict(OLD_DEMO, pool_norm="open", penalty_weight=3.0),
    "open_mim_upn": dict(MIM_UPN, pool_norm="open"),          # only the pooling changed from MIM's UPN
    # gates starting nearer the threshold (a = g + 1): larger straight-through gradients from the start
    "open_lb1_pw1": dict(OLD_DEMO, pool_norm="open", loc_bias=1.0),
    "open_lb1_pw03": dict(OLD_DEMO, pool_norm="open", loc_bias=1.0, penalty_weight=0.3),
    # the penalty weight scaled by the step's task L1 (large early, small once the model fits)
    "task_pw1": dict(OLD_DEMO, penalty_scale="task"),
    "open_task_pw1": dict(OLD_DEMO, pool_norm="open", penalty_scale="task"),
    # Diagnosis (benchmarks/upn_gradients.py, per-position gates): the logits above were one constant per
    # position (the score ReLU dead, the time MLP's per-position biases dominating), so whole positions
    # closed for every sample and then got no gradient. A linear score with a skip connection:
    "res_pw1": RESID,
    "res_pw03": dict(RESID, penalty_weight=0.3),
    "res_pw01": dict(RESID, penalty_weight=0.1),
    "res_pw3": dict(RESID, penalty_weight=3.0),
    "res_ratio5_pw03": dict(RESID, penalty_weight=0.3, mask_ratio=5),
    "res_task_pw1": dict(RESID, penalty_scale="task"),
    "res_open_pw03": dict(RESID, penalty_weight=0.3, pool_norm="open"),
    # res_pw03 separates early (epoch 5: 0.84/0.04, 0.83/0.09, 0.77/0.05) and then reopens impure steps, whose
    # logits hover around the threshold while clean ones sit at a ≈ 10, where the penalty's gradient is ~0:
    # a penalty that starts weak (clean steps separate first) and ends strong (pushes the impure ones down)
    "res_pw1_wu5": dict(RESID, penalty_weight=1.0, penalty_warmup=5),
    "res_pw1_wu10": dict(RESID, penalty_weight=1.0, penalty_warmup=10),
    "res_pw3_wu10": dict(RESID, penalty_weight=3.0, penalty_warmup=10),
    # the penalty P(c > τ) (the probability that the hard gate opens): its gradient peaks at the threshold
    "res_thr_pw03": dict(RESID, penalty_weight=0.3, gate_penalty="threshold"),
    "res_thr_pw1": dict(RESID, penalty_weight=1.0, gate_penalty="threshold"),
    # around the best so far (res_thr_pw03: 0.84/0.05, 0.75/0.16, 0.75/0.10)
    "res_thr_pw02": dict(RESID, penalty_weight=0.2, gate_penalty="threshold"),
    "res_thr_pw05": dict(RESID, penalty_weight=0.5, gate_penalty="threshold"),
    "res_thr_r5_pw03": dict(RESID, penalty_weight=0.3, gate_penalty="threshold", mask_ratio=5),
    "res_thr_open_pw03": dict(RESID, penalty_weight=0.3, gate_penalty="threshold", pool_norm="open"),
    "res_thr_task_pw1": dict(RESID, penalty_weight=1.0, gate_penalty="threshold", penalty_scale="task"),
    # Over T, a clean step is worth keeping in proportion to |y| (closing it shrinks k): res_thr_pw05 at
    # epoch 17 closes 66 % of the clean text steps in the quarter of samples with the smallest |y|, 4 % in the
    # largest, and keeps impure steps of strong samples open. Over the open steps every sample weighs alike,
    # but at 0.3 too little closes (res_thr_open_pw03): stronger penalties, now that positions cannot die
    "res_thr_open_pw06": dict(RESID, penalty_weight=0.6, gate_penalty="threshold", pool_norm="open"),
    "res_thr_open_pw1": dict(RESID, penalty_weight=1.0, gate_penalty="threshold", pool_norm="open"),
    "res_thr_open_pw2": dict(RESID, penalty_weight=2.0, gate_penalty="threshold", pool_norm="open"),
    # Over the open steps the gates close without regard to impurity at every weight: back to T, around
    # res_thr_pw03 / res_thr_r5_pw03
    "res_thr_r5_pw04": dict(RESID, penalty_weight=0.4, gate_penalty="threshold", mask_ratio=5),
    "res_thr_r5_pw03_lb5": dict(RESID, penalty_weight=0.3, gate_penalty="threshold", mask_ratio=5, loc_bias=5.0),
    "res_thr_r5_pw03_kgsoff": dict(RESID, penalty_weight=0.3, gate_penalty="threshold", mask_ratio=5,
                                   kgs_transfer=False),
    "res_thr_r5_pw03_batch": dict(RESID, penalty_weight=0.3, gate_penalty="threshold", mask_ratio=5,
                                  per_sample=False),
    # is it the KGS transfer that keeps open pooling from selecting? (its gradient on impure text logits was
    # -7e-4 at steps 450 and 750 of res_thr_open_pw03, benchmarks/upn_gradients.py)
    "res_thr_open_pw06_kgsoff": dict(RESID, penalty_weight=0.6, gate_penalty="threshold", pool_norm="open",
                                     kgs_transfer=False),
    # No: over the open steps whole positions close (one bias per position in the time MLP; closing a
    # position for every sample leaves the mean unbiased, so only the penalty speaks). Back to T, with the
    # penalty of each sample's steps priced by |yk - bias| (penalty_scale="sample"), against the |y| effect
    "res_thr_sample_pw03": dict(RESID, penalty_weight=0.3, gate_penalty="threshold", penalty_scale="sample"),
    "res_thr_sample_pw05": dict(RESID, penalty_weight=0.5, gate_penalty="threshold", penalty_scale="sample"),
    "res_thr_r5_sample_pw03": dict(RESID, penalty_weight=0.3, gate_penalty="threshold", penalty_scale="sample",
                                   mask_ratio=5),
    # the clean steps stay open now (0.02-0.03 closed at 0.3): stronger weights for the impure ones
    "res_thr_sample_pw07": dict(RESID, penalty_weight=0.7, gate_penalty="threshold", penalty_scale="sample"),
    "res_thr_sample_pw1": dict(RESID, penalty_weight=1.0, gate_penalty="threshold", penalty_scale="sample"),
    "res_thr_r5_sample_pw05": dict(RESID, penalty_weight=0.5, gate_penalty="threshold", penalty_scale="sample",
                                   mask_ratio=5),
    "res_thr_sample_pw06": dict(RESID, penalty_weight=0.6, gate_penalty="threshold", penalty_scale="sample"),
    # The demo's gates separate best around epochs 4-7 (text 0.90/0.05, audio 0.85/0.09, vision 0.84/0.06 at
    # epoch 7) and the impure audio/vision steps reopen later: a penalty that keeps growing through training
    "res_thr_pw06_wu15": dict(RESID, penalty_weight=0.6, gate_penalty="threshold", penalty_warmup=15),
    "res_thr_pw05_wu10": dict(RESID, penalty_weight=0.5, gate_penalty="threshold", penalty_warmup=10),
    "res_thr_pw1_wu30": dict(RESID, penalty_weight=1.0, gate_penalty="threshold", penalty_warmup=30),
}


def run_one(name: str, seed: int, epochs: int) -> dict:
    import torch

    from mim_fast import train as T

    torch.set_num_threads(1)
    overrides = dict(CANDIDATES[name])
    with tempfile.TemporaryDirectory() as out:
        cfg = T.TrainConfig(out=out, seed=seed, epochs=epochs, **overrides)
        t0 = time.time()
        result = T.run(cfg, progress=False, log=lambda *a: None)
        seconds = time.time() - t0
    hist = result["history"]
    best = result["best"]

    def summary(row):
        t = row["test"]
        return {"epoch": row["epoch"], "dev_l1": row["dev"]["l1"], "mae": t["mae_all"], "corr": t["corr_all"],
                "acc2": t["acc2_non0"],
                "closed": {m: [v["closed_impure"], v["closed_clean"]] for m, v in t["purification"].items()}}

    return {"candidate": name, "seed": seed, "epochs": epochs, "overrides": overrides, "seconds": seconds,
            "best": summary(best), "last": summary(hist[-1]), "history": [summary(h) for h in hist],
            "baseline_mae": result["baseline"]["mae_all"]}


def load(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def report(runs) -> str:
    import numpy as np

    by = {}
    for r in runs:
        by.setdefault((r["candidate"], r["epochs"]), []).append(r)
    lines = ["| candidate | epochs | seeds | test MAE (selected epoch; ± std over seeds, ddof 1) "
             "| text closed impure/clean | audio | vision | target met |", "|---|---:|---|---:|---|---|---|---|"]
    for (name, epochs), rs in by.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        mae = np.array([r["best"]["mae"] for r in rs])
        cells, ok = [], True
        for m in ("text", "audio", "vision"):
            imp = np.mean([r["best"]["closed"][m][0] for r in rs])
            cln = np.mean([r["best"]["closed"][m][1] for r in rs])
            ok &= imp >= 0.8 and cln <= 0.1
            cells.append("%.2f / %.2f" % (imp, cln))
        lines.append("| %s | %d | %s | %.4f ± %.4f | %s | %s |" % (
            name, epochs, ",".join(str(r["seed"]) for r in rs), mae.mean(),
            mae.std(ddof=1) if len(mae) > 1 else 0.0, " | ".join(cells),
            "yes" if ok and len(rs) >= 3 else ("(gates)" if ok else "no")))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", nargs="+", default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for k, v in CANDIDATES.items():
            print(k, v)
        return 0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.jsonl")
    done = {(r["candidate"], r["seed"], r["epochs"]) for r in load(path)}
    for name in args.candidates:
        if name not in CANDIDATES:
            print("unknown candidate %r (--list)" % name, file=sys.stderr)
            return 2
        for seed in args.seeds:
            if (name, seed, args.epochs) in done:
                continue
            r = run_one(name, seed, args.epochs)
            with open(path, "a") as f:
                f.write(json.dumps(r) + "\n")
            b = r["best"]
            print("%-16s seed %d: %4.0fs, best epoch %2d, test MAE %.4f; closed impure/clean %s" % (
                name, seed, r["seconds"], b["epoch"], b["mae"],
                "  ".join("%s %.2f/%.2f" % (m[0], *v) for m, v in b["closed"].items())), flush=True)
    table = report(load(path))
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(table + "\n")
    if args.report or args.candidates:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
