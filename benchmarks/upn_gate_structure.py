"""Which test steps a trained UPN closes: a diagnostic for benchmarks/upn_purification.py.

Trains one configuration (the demo preset with ``--set`` overrides, one thread) for ``--epochs`` epochs,
then evaluates the last epoch's model on the synthetic test split (expected gates) and prints, per
modality: the fraction closed per position t; the mean logit a = g + loc_bias per position and its
spread within a position (a logit that does not depend on the input has spread 0); the impure steps
closed by their offset inside the impure stretch; the clean neighbours of the stretch closed; and the
clean and impure steps closed by quartile of |y| (pooling over T values a step by |y|).

    python benchmarks/upn_gate_structure.py --epochs 12 --set mask_residual=true mask_score_relu=false
"""
import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from upn_gradients import _value  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides name=value (demo preset)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from mim_fast import train as T

    torch.set_num_threads(1)
    overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    with tempfile.TemporaryDirectory() as out:
        cfg = T.TrainConfig(out=out, seed=args.seed, epochs=args.epochs, **overrides)
        T.run(cfg, progress=False, log=lambda *a: None)
        state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]
    data = T.load_for_training(cfg)
    model = T.build_model(data, cfg)
    model.load_state_dict(state)
    model.eval()
    split = data.test
    batch = next(T.batches(split, len(split), shuffle=False, device=torch.device("cpu")))
    with torch.no_grad():
        out = model(batch.inputs, batch.lengths, noise=T._noise(model, batch, 1))
    print("config: %s, epochs %d, seed %d" % (cfg.overrides(), args.epochs, args.seed))
    y = batch.labels.abs()
    quart = torch.bucketize(y, torch.quantile(y, torch.tensor([0.25, 0.5, 0.75])))
    for i, name in enumerate(model.names):
        closed = 1 - out.gates[i]
        imp = batch.impurity[name].bool()
        a = out.logits[i] + cfg.loc_bias
        fmt = lambda vs: " ".join("%.2f" % v for v in vs)  # noqa: E731
        print("%s: impure %.2f / clean %.2f closed" % (name, float(closed[imp].mean()), float(closed[~imp].mean())))
        print("  closed per position:        " + fmt(closed.mean(0).tolist()))
        print("  clean closed per position:  " + fmt(float(closed[:, t][~imp[:, t]].mean()) if (~imp[:, t]).any()
                                                     else float("nan") for t in range(imp.shape[1])))
        print("  mean a per position:        " + " ".join("%.1f" % v for v in a.mean(0).tolist()))
        print("  spread of a within a position %.2f; mean a impure %.2f, clean %.2f" % (
            float((a - a.mean(0)).std()), float(a[imp].mean()), float(a[~imp].mean())))
        first, n = imp.float().argmax(1), imp.sum(1)
        offsets, neighbours = {}, []
        for b in range(imp.shape[0]):
            for k in range(int(n[b])):
                offsets.setdefault(k, []).append(float(closed[b, first[b] + k]))
            for t in (int(first[b]) - 1, int(first[b] + n[b])):
                if 0 <= t < imp.shape[1]:
                    neighbours.append(float(closed[b, t]))
        print("  impure closed by offset in the stretch: " + " ".join(
            "%d:%.2f" % (k, sum(v) / len(v)) for k, v in sorted(offsets.items())))
        print("  clean neighbours of the stretch closed: %.2f" % (sum(neighbours) / len(neighbours)))
        print("  by |y| quartile (weakest first): clean closed %s; impure closed %s" % (
            fmt(float(closed[quart == q][~imp[quart == q]].mean()) for q in range(4)),
            fmt(float(closed[quart == q][imp[quart == q]].mean()) for q in range(4))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
