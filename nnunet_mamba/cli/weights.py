"""``nnunet-mamba download-weights NAME``: fetch pretrained weights into the weights folder, verified."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoints import TRUST_PICKLE_ENV, CheckpointError
from ..networks import get_pretrained_spec, list_pretrained
from ..networks.weights import WEIGHTS_DIR_ENV
from ..pretrained import DownloadError, download_weights, file_sha256, weights_path
from .options import add_trust_pickle_option, trust_pickle

COMMAND = "download-weights"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(COMMAND, help="download pretrained weights (e.g. vmamba-tiny) and verify them",
                       description="Download pretrained weights, verify them (sha256 when pinned, keys and shapes "
                                   "always) and place them in the weights folder; a file never appears there "
                                   "unverified or half-written.")
    p.add_argument("name", choices=list_pretrained(), help="which weights")
    p.add_argument("--from-file", type=Path, metavar="PATH",
                   help="install this local copy instead of downloading (machines without internet); "
                        "it is verified the same way")
    p.add_argument("--force", action="store_true", help="replace the file if it is already there")
    p.add_argument("--dir", type=Path, metavar="DIR",
                   help=f"weights folder (default: ${WEIGHTS_DIR_ENV} if set, else ~/.cache/nnunet_mamba)")
    add_trust_pickle_option(p, "files holding pickled Python objects besides tensors",
                            f". Training then needs {TRUST_PICKLE_ENV}=1 to load the file too")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    present = weights_path(args.name, args.dir).exists() and not args.force
    try:
        path = download_weights(args.name, force=args.force, from_file=args.from_file, weights_dir=args.dir,
                                trust_pickle=trust_pickle(args))
    except (CheckpointError, DownloadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if present:
        print(f"{args.name}: already present and verified (--force replaces it)", file=sys.stderr)
    print(f"{args.name}: {path}")
    digest = file_sha256(path)
    spec = get_pretrained_spec(args.name)
    if spec.sha256:
        note = " (matches the pinned value)"
    elif spec.reported_sha256:
        note = (" (matches the digest reported for a published upload)" if digest in spec.reported_sha256 else
                " (differs from the digest reported for one published upload; the release was re-uploaded, and "
                "the file's keys and shapes are verified)")
    else:
        note = ""
    print(f"sha256: {digest}{note}")
    return 0

