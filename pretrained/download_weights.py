#!/usr/bin/env python
"""Download pretrained weights into this folder: ``python pretrained/download_weights.py vmamba-tiny``.

The same as ``nnunet-mamba download-weights`` (see ``--help``); run it from a source checkout.
"""
import sys
from pathlib import Path

# Running the script from a checkout puts pretrained/ on sys.path, not the checkout: add it, so the package
# imports even where it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nnunet_mamba.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["download-weights", *sys.argv[1:]]))
