"""``nnunet-mamba list``: registered networks and trainers."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list networks and nnU-Net trainers")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..networks import get_network_spec, list_networks
    from .environment import ext_trainer_hint

    print("networks (nnunet_mamba.create_network):")
    width = max(map(len, list_networks()))
    for name in list_networks():
        spec = get_network_spec(name)
        dims = "/".join(f"{d}D" for d in spec.dims)
        print(f"  {name:<{width}} {dims:<6} {spec.summary}")
    try:
        from ..trainers import list_trainers
    except ImportError as exc:
        print(f"trainers: unavailable ({exc}); install nnunetv2")
        return 0
    print("trainers (nnUNetv2_train ... -tr NAME; needs nnUNet_extTrainer, see `nnunet-mamba env`):")
    for name in list_trainers():
        print(f"  {name}")
    hint = ext_trainer_hint()
    if hint:
        print(f"note: {hint}")
    return 0
