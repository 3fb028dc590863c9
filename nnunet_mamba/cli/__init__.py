"""``nnunet-mamba`` command line: demo, env, list, benchmark, download-weights, import-checkpoint."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .. import __version__


def main(argv: Optional[List[str]] = None) -> int:
    from . import benchmark, demo, environment, import_checkpoint, learning, listing, plan, weights

    parser = argparse.ArgumentParser(prog="nnunet-mamba", description="Mamba segmentation networks for nnU-Net v2")
    parser.add_argument("--version", action="version", version=f"nnunet-mamba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (demo, environment, listing, plan, benchmark, learning, weights, import_checkpoint):
        module.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
