"""Where the demo's UPN costs Acc-2 (README, "Ablation"): sign errors and mean |prediction| of the test
split by quartile of |y|, for the demo run in runs/demo (make demo; its best epoch) and for the same model
without the UPN (trained here, seed 0, one thread), and the clean steps the demo's gates close by quartile.

    python benchmarks/ablation_sign_errors.py
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best_predictions(out):
    import torch

    from mim_fast import runs
    from mim_fast import train as T

    ck = runs.load_checkpoint(os.path.join(out, "best.pt"))
    cfg = T.TrainConfig(**json.loads(ck["config"]))
    data = T.load_for_training(cfg)
    model = T.build_model(data, cfg)
    model.load_state_dict(ck["model"])
    model.eval()
    batch = next(T.batches(data.test, len(data.test), shuffle=False, device=torch.device("cpu")))
    with torch.no_grad():
        return model(batch.inputs, batch.lengths, noise=T._noise(model, batch, 1)), batch, ck["epoch"], model.names


def main() -> int:
    import torch

    from mim_fast import train as T

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        T.run(T.TrainConfig(out=tmp, upn=False), progress=False, log=lambda *a: None)
        results = [("demo (runs/demo)", best_predictions("runs/demo")), ("no UPN", best_predictions(tmp))]
    for name, (out, batch, epoch, names) in results:
        y, p = batch.labels, out.prediction
        q = torch.bucketize(y.abs(), torch.quantile(y.abs(), torch.tensor([0.25, 0.5, 0.75])))
        wrong = (p >= 0) != (y >= 0)
        print("%s, epoch %d: sign errors by |y| quartile (weakest first) %s of %s; mean |prediction| %s" % (
            name, epoch, [int(wrong[q == k].sum()) for k in range(4)], [int((q == k).sum()) for k in range(4)],
            ["%.2f" % float(p[q == k].abs().mean()) for k in range(4)]))
        if name.startswith("demo"):
            for i, m in enumerate(names):
                closed, imp = 1 - out.gates[i], batch.impurity[m].bool()
                print("  %s: clean steps closed by |y| quartile %s" % (m, [
                    "%.2f" % float(closed[q == k][~imp[q == k]].mean()) for k in range(4)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
