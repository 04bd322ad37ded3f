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
    tr.add_argument("--preset", choices=["mim", "demo"],
                    help="mim = the released MIM code's settings; demo = the fast synthetic demo (default: demo on "
                         "synthetic data, mim on a pickle); the options below override it")
    tr.add_argument("--out", default="runs/mim", help="run folder (config, metrics, checkpoints, plots)")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--d-model", type=int)
    tr.add_argument("--fusion", choices=["multiplication", "add", "concat", "tensor"])
    tr.add_argument("--routing", choices=["per-sample", "batch", "off"],
                    help="KGS routing (batch = the released code; off = no intra/inter knowledge transfer)")
    tr.add_argument("--optimizer", choices=["two-phase", "joint"])
    tr.add_argument("--eval-gate", choices=["expected", "sample"], help="gates in evaluation (sample = published)")
    tr.add_argument("--penalty-weight", type=float,
                    help="weight of the gate penalty in the mask learners' update (MIM: 0.1; the demo: 1.0)")
    tr.add_argument("--mask-ratio", type=int, help="the mask learner's time bottleneck T/ratio (MIM: 5; the demo: 1)")
    tr.add_argument("--mask-score-bias", type=_score_bias,
                    help="initial bias of the mask learner's score unit, or 'pytorch' (MIM's default init)")
    tr.add_argument("--pool-norm", choices=["T", "open"],
                    help="purified pooling: mean over T (MIM) or over the open steps")
    tr.add_argument("--gate-penalty", choices=["mim", "threshold"],
                    help="the penalty's q: P(c > 0) (mim) or P(c > tau), the hard gate's open probability (demo)")
    tr.add_argument("--penalty-scale", choices=["none", "task", "sample"],
                    help="task: the weight times the step's task L1; sample: each sample's steps priced by "
                         "|yk - bias| (MIM: none)")
    tr.add_argument("--penalty-warmup", type=float, help="epochs over which the penalty weight ramps up from 0")
    tr.add_argument("--mask-score-relu", action=argparse.BooleanOptionalAction,
                    help="the ReLU that ends the mask learner's score (MIM: yes; demo: no)")
    tr.add_argument("--mask-residual", action=argparse.BooleanOptionalAction,
                    help="a skip connection around the mask learner's time MLP (MIM: no; demo: yes)")
    tr.add_argument("--no-upn", dest="upn", action="store_const", const=False,
                    help="no purification networks (an ablation: k_m = u_m)")
    tr.add_argument("--layers", dest="av_layers", type=int, help="audio/vision Transformer layers (MIM: 3)")
    tr.add_argument("--amp", choices=["none", "bf16", "fp16"])
    tr.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    tr.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda", "triton"])
    tr.add_argument("--bert", dest="bert_path", help="local Hugging Face BERT directory for token-id text")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    from . import bench
    from .ablate import add_arguments as ablate_arguments
    from .profile import add_arguments as profile_arguments

    bench.add_parser(sub)
    profile_arguments(sub.add_parser("profile", help="torch.profiler traces of the training step, eager vs fused: "
                                     "top ops, time per named range, launches per step"))
    ablate_arguments(sub.add_parser("ablate", help="the ablation table on the synthetic data: no UPN / published UPN "
                                    "/ ours x KGS off / batch / per-sample routing, mean ± std over seeds"))
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main

        return info_main()
    if args.command == "train":
        return _train(args)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "ablate":
        from .ablate import main as ablate_main

        return ablate_main(args)
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

    given = {name: getattr(args, name) for name in (
        "preset", "epochs", "batch_size", "lr", "seed", "d_model", "fusion", "optimizer", "eval_gate", "amp", "device",
        "backend", "bert_path", "penalty_weight", "mask_ratio", "mask_score_bias", "pool_norm", "penalty_scale",
        "upn", "av_layers", "gate_penalty", "penalty_warmup", "mask_score_relu", "mask_residual")}
    if args.routing == "off":
        given["kgs_transfer"] = False
    elif args.routing is not None:
        given["per_sample"] = args.routing == "per-sample"
    try:
        # explicit options go into the constructor: the preset fills only what was not given
        config = TrainConfig(data=args.data, out=args.out, **{k: v for k, v in given.items() if v is not None})
        run(config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    except (RunFolderExists, DataFileNotFoundError, FileNotFoundError, ValueError) as exc:
        print("mim-fast train: error: %s" % exc, file=sys.stderr)
        return 2
    return 0


def _score_bias(text: str):
    return text if text == "pytorch" else float(text)


if __name__ == "__main__":
    sys.exit(main())
