"""Command-line options that several commands share, defined once so that they read and behave the same."""
from __future__ import annotations

import argparse


def add_trust_pickle_option(parser: argparse.ArgumentParser, accepts: str, note: str) -> None:
    """``--trust-pickle``: opt in to full unpickling; ``accepts`` says of what, ``note`` ends the help."""
    parser.add_argument("--trust-pickle", action="store_true",
                        help=f"also accept {accepts} (loaded with weights_only=False, which can run code from the "
                             f"file): only for sources you trust{note}")


def trust_pickle(args: argparse.Namespace) -> bool | None:
    """``True`` with --trust-pickle; ``None`` without, so that ``$NNUNET_MAMBA_TRUST_PICKLE`` decides (as it does for
    the trainers)."""
    return True if args.trust_pickle else None
