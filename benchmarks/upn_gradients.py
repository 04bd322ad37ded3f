"""Where the UPN's gate logits are pushed, impure vs clean steps: a diagnostic for benchmarks/upn_purification.py.

Trains one configuration on the synthetic demo data (one thread) with `mim_fast.train`'s own step and,
every ``--every`` steps, splits the gradient that reaches the gate logits g (B, T) into its sources —
the penalty (phase A), ``masked`` (phase A), the task loss and the KGS transfer terms (phase B) — and
averages each over the impure and over the clean training steps of the batch, per modality, next to
the mean logit a = g + loc_bias. A negative gradient on a logit pushes that gate open (gradient descent
raises g), a positive one pushes it closed.

    python benchmarks/upn_gradients.py --set pool_norm=open penalty_weight=0.3 --steps 600
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _value(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides name=value (demo preset)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    import torch

    from mim_fast import train as T

    torch.set_num_threads(1)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = T.TrainConfig(out="", seed=args.seed, **{k: _value(v) for k, v in overrides.items()})
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    data = T.load_for_training(cfg)
    model = T.build_model(data, cfg)
    opt = T.Optimizers(model, cfg, device)
    rows, step, epoch = [], 0, 0
    print("config: %s" % json.dumps(cfg.overrides()))
    print("step | modality | a impure / clean | dL/dg ×1e4 impure / clean: penalty | masked | task | KGS")
    while step < args.steps:
        epoch += 1
        noise_seed = T._epoch_seed(cfg.seed, epoch, 1)
        for batch in T.batches(data.train, cfg.batch_size, shuffle=True, device=device,
                               seed=T._epoch_seed(cfg.seed, epoch, 2)):
            out, kgs, task, loss_a, loss_b = T.compute_losses(model, batch, cfg, noise_seed, device)
            if step % args.every == 0:
                weight = cfg.penalty_weight * (task.detach() if cfg.penalty_scale == "task" else 1.0)
                terms = {"penalty": weight * out.penalty.sum(), "masked": kgs.masked, "task": task,
                         "kgs": kgs.inter + kgs.intra}
                grads = {k: torch.autograd.grad(v, out.logits, retain_graph=True, allow_unused=True)
                         for k, v in terms.items()}
                for i, name in enumerate(model.names):
                    imp = batch.impurity[name].bool()
                    a = out.logits[i].detach() + cfg.loc_bias
                    row = {"step": step, "modality": name, "a_impure": float(a[imp].mean()),
                           "a_clean": float(a[~imp].mean())}
                    for k, g in grads.items():
                        g = torch.zeros_like(a) if g[i] is None else g[i]
                        row[k] = [float(g[imp].mean()) * 1e4, float(g[~imp].mean()) * 1e4]
                    rows.append(row)
                    print("%4d | %-6s | %5.2f / %5.2f | %s" % (step, name, row["a_impure"], row["a_clean"], " | ".join(
                        "%+6.2f / %+6.2f" % tuple(row[k]) for k in terms)), flush=True)
            opt.step(loss_a, loss_b)
            step += 1
            if step >= args.steps:
                break
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": overrides, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
