"""The ``mim-fast`` command (also ``python -m mim_fast``): info, demo, train, ablate, bench, profile.

Only the parser of the command that runs is built, with that command's imports: ``mim-fast --help``
lists the commands without importing torch (it answers in a fraction of a second; torch alone takes
1-1.5 s to import). Every error is one line on stderr, ``<prog>: error: <what is wrong>``: exit status 2
for a mistake in the arguments (nothing is written), 1 for a failure while running, 130 after Ctrl-C.
``mim-fast train --debug`` shows the traceback instead.
"""
import argparse
import os
import sys

COMMANDS = {
    "info": "print what is built and which backends can run here (and why not)",
    "demo": "run both ops on random inputs with every available backend",
    "train": "train and evaluate MIM (default: the synthetic demo dataset)",
    "ablate": "the ablation table on the synthetic data: no UPN / published UPN / ours x KGS off / batch / "
              "per-sample routing, mean ± std over seeds",
    "bench": "time every op per provider (eager, torch.compile, fused backends)",
    "profile": "torch.profiler traces of the training step, eager vs fused: top ops, time per named range, "
               "launches per step",
}

# --threads default of `mim-fast train`. Results depend on the thread count (reductions are split
# differently): a fixed default gives the same numbers on every machine. And on the 2-core CI VM with other
# jobs running (load 3-5), 2 threads took 53 s per demo epoch against 4.75 s with 1, and 91 s against 6.0 s
# at the paper's width and batch (benchmarks/train_threads.py, benchmarks/results/2026-12-01-cpu-2core/
# threads/): OpenMP threads spin-wait on each other on a contended core.
DEFAULT_THREADS = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: <message> (see <prog> -h)``, exit status 2."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see %s -h)\n" % (self.prog, message, self.prog))


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("must be an integer >= %d; got %r" % (minimum, text)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError("must be an integer >= %d; got %r" % (minimum, text))
        return value
    return parse


def _number(positive: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > 0 if positive else value >= 0) or value == float("inf"):
            raise argparse.ArgumentTypeError("must be a finite number %s 0; got %r" % (">" if positive else ">=", text))
        return value
    return parse


def train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``mim-fast train``, each with its default (a preset's for the preset fields)."""
    from .train import PRESETS, TrainConfig

    d = TrainConfig()

    def _by_preset(name):
        return "default: the preset's, mim %s, demo %s" % (PRESETS["mim"][name], PRESETS["demo"][name])

    g = p.add_argument_group("data and run folder")
    g.add_argument("--data", help="'synthetic' (the generated demo dataset) or the path of a MAG-BERT or MMSA "
                                  "pickle of CMU-MOSI/MOSEI (default: synthetic)")
    g.add_argument("--out", help="the run folder: config.json, metrics.json, checkpoints, plots (default: %s). "
                                 "It must be new or empty, unless --resume or --overwrite" % d.out)
    g.add_argument("--max-len", type=_int_at_least(1), help="MAG-BERT pickles: pad/truncate every sample to this "
                                                            "many words (default: %d)" % d.max_len)
    g.add_argument("--trust-data", action="store_true",
                   help="unpickle the data file without the plain-data restriction (only for files you trust: "
                        "unpickling can run code)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint; only --epochs, --device, "
                        "--backend (and the run options below) may change")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (deletes only the files a run writes; refuses a folder that is "
                        "not a run folder)")
    g = p.add_argument_group("preset and training (each option overrides its preset's value)")
    g.add_argument("--preset", choices=list(PRESETS),
                   help="mim: the released MIM code's settings; demo: the fast synthetic demo, whose purification "
                        "network purifies (default: demo on synthetic data, mim on a pickle)")
    g.add_argument("--epochs", type=_int_at_least(1), help="epochs to train; with --resume, the total to reach "
                                                            "(%s)" % _by_preset("epochs"))
    g.add_argument("--batch-size", type=_int_at_least(1), help="samples per step (%s)" % _by_preset("batch_size"))
    g.add_argument("--lr", type=_number(True), help="Adam learning rate of both optimizers (%s)" % _by_preset("lr"))
    g.add_argument("--seed", type=_int_at_least(0), help="seed of the init, data order, dropout and gate noise "
                                                         "(default: %d)" % d.seed)
    g.add_argument("--d-model", type=_int_at_least(2), help="feature width D (%s)" % _by_preset("d_model"))
    g.add_argument("--layers", dest="av_layers", type=_int_at_least(0),
                   help="Transformer layers of the audio and vision encoders (%s)" % _by_preset("av_layers"))
    g.add_argument("--fusion", choices=["multiplication", "add", "concat", "tensor"],
                   help="how the purified modalities are fused (%s)" % _by_preset("fusion"))
    g.add_argument("--routing", choices=["per-sample", "batch", "off"],
                   help="KGS routing: per sample (the paper) or by batch means (the released code); off: no "
                        "intra/inter knowledge transfer, an ablation (default: the preset's, mim batch, demo per-sample)")
    g.add_argument("--optimizer", choices=["two-phase", "joint"],
                   help="two-phase: MIM's two Adam steps from one graph; joint: one Adam on the sum "
                        "(%s)" % _by_preset("optimizer"))
    g.add_argument("--eval-gate", choices=["expected", "sample"],
                   help="gates in evaluation: expected (deterministic) or sample (the published code) "
                        "(%s)" % _by_preset("eval_gate"))
    g = p.add_argument_group("the purification network (each option overrides its preset's value)")
    g.add_argument("--penalty-weight", type=_number(False),
                   help="weight of the gate penalty in the mask learners' update (%s)" % _by_preset("penalty_weight"))
    g.add_argument("--gate-penalty", choices=["mim", "threshold"],
                   help="the penalty's q: mim = P(c > 0), threshold = P(c > tau), the probability that the hard gate "
                        "opens (%s)" % _by_preset("gate_penalty"))
    g.add_argument("--mask-ratio", type=_int_at_least(1),
                   help="the mask learner's time bottleneck T -> T/ratio -> T (%s)" % _by_preset("mask_ratio"))
    g.add_argument("--mask-score-bias", type=_score_bias,
                   help="initial bias of the mask learner's score unit, or 'pytorch' for PyTorch's default init "
                        "(%s)" % _by_preset("mask_score_bias"))
    g.add_argument("--mask-score-relu", action=argparse.BooleanOptionalAction,
                   help="the ReLU that ends the mask learner's score (%s)" % _by_preset("mask_score_relu"))
    g.add_argument("--mask-residual", action=argparse.BooleanOptionalAction,
                   help="a skip connection around the mask learner's time MLP (%s)" % _by_preset("mask_residual"))
    g.add_argument("--pool-norm", choices=["T", "open"],
                   help="purified pooling: the mean over T or over the open steps (%s)" % _by_preset("pool_norm"))
    g.add_argument("--penalty-scale", choices=["none", "task", "sample"],
                   help="task: the weight times the step's task L1; sample: each sample's steps priced by "
                        "|yk - bias| (%s)" % _by_preset("penalty_scale"))
    g.add_argument("--penalty-warmup", type=_number(False),
                   help="epochs over which the penalty weight ramps up from 0 (%s)" % _by_preset("penalty_warmup"))
    g.add_argument("--no-upn", dest="upn", action="store_const", const=False,
                   help="no purification networks (an ablation: the purified representation is the unpurified one)")
    g = p.add_argument_group("other")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], help="autocast precision (default: %s)" % d.amp)
    g.add_argument("--bert", dest="bert_path", metavar="DIR",
                   help="a local Hugging Face BERT folder for token-id text (default: a learned word embedding)")
    g = p.add_argument_group("where and how it runs (may change on --resume)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... or auto (default: auto = cuda when torch sees a GPU)")
    g.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda", "triton"],
                   help="backend of the fused ops (default: auto = the fastest that can run on the device)")
    g.add_argument("--threads", type=_int_at_least(1), default=DEFAULT_THREADS,
                   help="CPU threads of torch (default: %d — the same numbers on every machine, and 2 threads "
                        "were 5-25x slower on a loaded 2-core machine; raise it on an idle many-core CPU; recorded "
                        "in metrics.json)" % DEFAULT_THREADS)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (off by default: on this project's 2-core CPU a compiled "
                        "step measured slower than eager, see README; recorded in metrics.json)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each training step as one CUDA graph, captured once per epoch (CUDA, one process; "
                        "not with --amp fp16 or --compile; recorded in metrics.json)")
    g.add_argument("--keep-checkpoints", type=_int_at_least(1), default=3, metavar="K",
                   help="keep the last K epoch checkpoints; --resume falls back to an older one if the newest "
                        "is damaged (default: 3)")
    g.add_argument("--quiet", action="store_true", help="no progress bar (it is drawn on a terminal only)")
    g.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")


def _score_bias(text: str):
    if text == "pytorch":
        return text
    return _number_any(text)


def _number_any(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError("must be a finite number or 'pytorch'; got %r" % text)
    return value


# argparse dest -> TrainConfig field, for the options that set one
_TRAIN_FIELDS = ("data", "out", "preset", "epochs", "batch_size", "lr", "seed", "d_model", "av_layers", "fusion",
                 "optimizer", "eval_gate", "amp", "device", "backend", "bert_path", "penalty_weight", "gate_penalty",
                 "mask_ratio", "mask_score_bias", "mask_score_relu", "mask_residual", "pool_norm", "penalty_scale",
                 "penalty_warmup", "upn", "max_len")


def _train(args, prog: str) -> int:
    from . import train

    given = {k: getattr(args, k) for k in _TRAIN_FIELDS if getattr(args, k) is not None}
    if args.routing == "off":
        given["kgs_transfer"] = False
    elif args.routing is not None:
        given["per_sample"] = args.routing == "per-sample"
    opts = dict(progress=not args.quiet, keep_checkpoints=args.keep_checkpoints, threads=args.threads,
                trust_data=args.trust_data, compile=args.compile,
                cuda_graphs=args.cuda_graphs)
    # Under torchrun every process runs this; rank 0 reports, the others print only errors of their own.
    rank = int(os.environ.get("RANK", "0"))
    if rank:
        prog = "%s (rank %d)" % (prog, rank)
    try:
        if args.resume and args.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
        if args.resume:
            train.resume(given.pop("out", train.TrainConfig.out), given, **opts)
        else:
            train.run(train.TrainConfig(**given), overwrite=args.overwrite, **opts)
    except train.Interrupted as exc:
        if rank:
            return 130
        if not args.quiet and sys.stderr.isatty():
            sys.stderr.write("\n")  # end the progress bar's line
        print("%s: %s" % (prog, exc), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # during setup, before the first write of a new run or any epoch of a resumed one
        if rank:
            return 130
        print("%s: interrupted before training started; nothing was written" % prog, file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 — one line, never a traceback (unless --debug)
        from .distributed import PeerFailed

        if args.debug:
            raise
        if rank and isinstance(exc, PeerFailed):  # rank 0 reports it
            return 1
        print("%s: error: %s" % (prog, _describe(exc, given.get("out"))), file=sys.stderr)
        usage = isinstance(exc, ValueError) and not isinstance(exc, (train.CheckpointError, train.TrainingDiverged))
        return 2 if usage else 1
    return 0


def _describe(exc: BaseException, out) -> str:
    """One line for an error: its message; for a failed write, the file and the reason."""
    if isinstance(exc, OSError) and not isinstance(exc, ValueError):  # DataFileNotFoundError is both
        name = str(exc.filename) if exc.filename else (out or "the run folder")
        return "cannot write %s: %s" % (name, exc.strerror or exc)
    text = str(exc).strip().splitlines()
    text = text[0] if text else ""
    if isinstance(exc, ValueError) or type(exc).__module__.startswith("mim_fast"):
        return text or type(exc).__name__
    return "%s: %s (rerun with --debug for the traceback)" % (type(exc).__name__, text)


def _command_parser(name: str, p: argparse.ArgumentParser) -> None:
    if name == "demo":
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    elif name == "train":
        train_arguments(p)
    elif name == "ablate":
        from .ablate import add_arguments

        add_arguments(p)
    elif name == "bench":
        from . import bench

        bench.add_arguments(p)
    elif name == "profile":
        from .profile import add_arguments

        add_arguments(p)


def parser(command=None) -> argparse.ArgumentParser:
    """The mim-fast parser; only ``command``'s own options are added (the others are never parsed)."""
    top = ArgumentParser(prog="mim-fast", description="mim_fast: fused kernels for MIM (Multimodal Information "
                                                      "Modulation). Run `mim-fast <command> -h` for its options.")
    sub = top.add_subparsers(dest="command", required=True, metavar="command")
    top.commands = {}
    for name, text in COMMANDS.items():
        top.commands[name] = p = sub.add_parser(name, help=text, description=text)
        if name == command:
            _command_parser(name, p)
    return top


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    top = parser(command)
    args, extra = top.parse_known_args(argv)
    if extra:  # reported by the command's parser, so the message names the command
        top.commands[args.command].error("unrecognized arguments: %s" % " ".join(extra))
    prog = "mim-fast " + args.command
    if args.command == "info":
        from .info import main as info_main

        return info_main()
    if args.command == "train":
        return _train(args, prog)
    if args.command == "bench":
        from . import bench

        return bench.main(args)
    if args.command == "ablate":
        from .ablate import main as ablate_main

        return ablate_main(args)
    if args.command == "profile":
        from .profile import main as profile_main

        return profile_main(args)
    from .demo import main as demo_main

    return demo_main(device=args.device)


if __name__ == "__main__":
    sys.exit(main())
