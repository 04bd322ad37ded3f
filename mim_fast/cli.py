"""The ``mim-fast`` command (also ``python -m mim_fast``)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mim-fast", description="mim_fast: fused kernels for MIM")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what is built and which backends can run here (and why not)")
    demo = sub.add_parser("demo", help="run both ops on random inputs with every available backend")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main

        return info_main()
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(device=args.device)
    return 2


if __name__ == "__main__":
    sys.exit(main())
