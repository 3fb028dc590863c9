"""``nnunet-mamba`` command line: one module per command (the table below), imported only when it runs."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from .. import __version__

# command -> (module in this package, one-line help). Only the module of the command being run is imported (most
# import torch, which takes seconds), so `nnunet-mamba --help` and `nnunet-mamba env --exports` start fast. Each
# module's add_parser(sub) registers the command with this same help (tests/test_cli.py checks they agree).
COMMANDS = {
    "demo": ("demo", "train and evaluate a U-Mamba on a small synthetic 2D dataset (minutes on a CPU)"),
    "env": ("environment", "print shell exports for nnU-Net (eval \"$(nnunet-mamba env)\") and diagnostics"),
    "list": ("listing", "list networks and nnU-Net trainers"),
    "plan": ("plan", "write nnU-Net plans for one of our networks (train with nnUNetv2_train -p NAME)"),
    "benchmark": ("benchmark", "training-step time, peak memory and parameters of networks"),
    "learning-benchmark": ("learning", "train trainers and nnU-Net's baselines on synthetic context tasks (real "
                                       "nnUNetv2_train, one schedule, several seeds); table of validation Dice, "
                                       "s/epoch, peak memory"),
    "download-weights": ("weights", "download pretrained weights (e.g. vmamba-tiny) and verify them"),
    "import-checkpoint": ("import_checkpoint", "convert a model trained with the original U-Mamba / Swin-UMamba code"),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM, ``docker stop``, ``kill``), raised like Ctrl-C so that cleanup code runs."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command`` (if one of ours) gets its full arguments, the others are listed by name."""
    parser = argparse.ArgumentParser(prog="nnunet-mamba", description="Mamba segmentation networks for nnU-Net v2")
    parser.add_argument("--version", action="version", version=f"nnunet-mamba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(f".{module}", __name__).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (an embedding application): leave its signals alone
        previous = None
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
