"""The ``mim-fast`` command (also ``python -m mim_fast``)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mim-fast", description="mim_fast: fused kernels for MIM")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what is built and which backends can run here (and why not)")
    demo = sub.add_parser("demo", help="run both ops on random inputs with every available backend")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    tr = sub.add_parser("train", help="train and evaluate MIM (default: the synthetic dataset, ~2 min on 2 cores)")
    tr.add_argument("--data", default="synthetic", help="'synthetic' (default) or a MAG-BERT / MMSA pickle")
    tr.add_argument("--out", default="runs/mim", help="run folder (config, metrics, checkpoints, plots)")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--d-model", type=int)
    tr.add_argument("--fusion", choices=["multiplication", "add", "concat", "tensor"])
    tr.add_argument("--routing", choices=["per-sample", "batch"], help="KGS routing (batch = the released code)")
    tr.add_argument("--optimizer", choices=["two-phase", "joint"])
    tr.add_argument("--eval-gate", choices=["expected", "sample"], help="gates in evaluation (sample = published)")
    tr.add_argument("--penalty-weight", type=float,
                    help="weight of the gate penalty in the mask learners' update (MIM: 0.1; the demo: 1.0)")
    tr.add_argument("--mask-ratio", type=int, help="the mask learner's time bottleneck T/ratio (MIM: 5; the demo: 1)")
    tr.add_argument("--amp", choices=["none", "bf16", "fp16"])
    tr.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    tr.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda", "triton"])
    tr.add_argument("--bert", dest="bert_path", help="local Hugging Face BERT directory for token-id text")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    from . import bench
    from .profile import add_arguments as profile_arguments

    bench.add_parser(sub)
    profile_arguments(sub.add_parser("profile", help="torch.profiler traces of the training step, eager vs fused: "
                                     "top ops, time per named range, launches per step"))
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main

        return info_main()
    if args.command == "train":
        return _train(args)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "profile":
        from .profile import main as profile_main

        return profile_main(args)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(device=args.device)
    return 2


def _train(args) -> int:
    from .data import DataFileNotFoundError
    from .train import RunFolderExists, TrainConfig, run

    config = TrainConfig(data=args.data, out=args.out)
    for name in ("epochs", "batch_size", "lr", "seed", "d_model", "fusion", "optimizer", "eval_gate", "amp", "device",
                 "backend", "bert_path", "penalty_weight", "mask_ratio"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if args.routing is not None:
        config.per_sample = args.routing == "per-sample"
    try:
        run(config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    except (RunFolderExists, DataFileNotFoundError, FileNotFoundError, ValueError) as exc:
        print("mim-fast train: error: %s" % exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
