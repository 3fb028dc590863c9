"""``nnunet-mamba import-checkpoint SRC DST``: models trained with the original U-Mamba or Swin-UMamba repositories
into ones that nnU-Net 2.8 (``nnUNetv2_predict``, ``nnUNetv2_train --c``) loads with our trainers.

The arguments and messages; the conversion and its checks are :mod:`nnunet_mamba.checkpoint_import`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..checkpoint_import import import_checkpoint_file, import_model_folder
from ..checkpoints import TRUST_PICKLE_ENV, CheckpointError
from .options import add_trust_pickle_option, trust_pickle

COMMAND = "import-checkpoint"
DESCRIPTION = ("Convert a model trained with the original U-Mamba or Swin-UMamba repositories into one that "
               "nnU-Net 2.8 loads with our trainers: SRC is its model folder, DST the dataset's results folder "
               "($nnUNet_results/DatasetXXX_Name), which receives <trainer>__<plans>__<configuration>/. Checkpoints "
               "are converted and checked against our network; other files are copied unchanged; the source is only "
               "read. A single checkpoint file SRC is converted into the file DST.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(COMMAND, help="convert a model trained with the original U-Mamba / Swin-UMamba code",
                       description=DESCRIPTION)
    p.add_argument("src", type=Path, metavar="SRC",
                   help="model folder <trainer>__<plans>__<configuration>/ (or a single checkpoint .pth)")
    p.add_argument("dst", type=Path, metavar="DST",
                   help="results folder of the dataset, e.g. $nnUNet_results/Dataset001_Name (for a .pth SRC: the "
                        "output file or a folder for it)")
    p.add_argument("--trainer", metavar="NAME",
                   help="store this trainer name instead of the default (the original name; "
                        "nnUNetTrainerUMambaEncNoAMP becomes nnUNetTrainerUMambaEnc)")
    p.add_argument("--force", action="store_true", help="replace the destination if it exists")
    add_trust_pickle_option(p, "checkpoints holding pickled Python objects beyond tensors, plain containers and "
                               "numpy scalars", f"; {TRUST_PICKLE_ENV}=1 does the same")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    trust = trust_pickle(args)
    try:
        if args.src.is_dir():
            result = import_model_folder(args.src, args.dst, args.trainer, args.force, trust)
        elif args.src.is_file():
            result = import_checkpoint_file(args.src, args.dst, args.trainer, args.force, trust)
        else:
            raise FileNotFoundError(f"{args.src}: no such model folder or checkpoint file")
    except (CheckpointError, OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"imported: {result}")
    if result.is_dir():
        folds = sorted({p.parent.name[len("fold_"):] for p in result.glob("fold_*/checkpoint_*.pth")})
        print(f'predict with: eval "$(nnunet-mamba env)"; nnUNetv2_predict_from_modelfolder -i INPUT -o OUTPUT '
              f"-m {shlex.quote(str(result))} -f {' '.join(folds)}")
    return 0

