"""``nnunet-mamba plan``: a plans file with which nnU-Net's own trainer and predictor use one of our networks."""
from __future__ import annotations

import argparse
import os

from ..networks import list_networks


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="write nnU-Net plans for one of our networks (train with nnUNetv2_train -p NAME)")
    p.add_argument("-d", "--dataset", required=True, help="dataset name or id, as for nnUNetv2_train")
    p.add_argument("--arch", required=True, choices=list_networks(), metavar="NAME",
                   help=f"the network: {', '.join(list_networks())}")
    p.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG",
                   help="configurations to plan (default: every one of the source plans the network supports)")
    p.add_argument("--gpu-memory-gb", type=float, default=8.0,
                   help="target for the estimated peak training memory, in GiB as torch.cuda.max_memory_allocated "
                        "counts it (default: %(default)s, nnU-Net's)")
    p.add_argument("--plans-name", help="name of the plans written (default: nnUNetMambaPlans_<arch>)")
    p.add_argument("--source-plans", default="nnUNetPlans",
                   help="nnU-Net plans to start from, e.g. nnUNetResEncUNetMPlans (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from ..planning.plans import default_plans_name, plan_for_network

    if not nnUNet_preprocessed:
        raise SystemExit("nnUNet_preprocessed is not set; see `nnunet-mamba env`")
    try:
        dataset = maybe_convert_to_dataset_name(args.dataset)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"dataset {args.dataset!r}: {exc}") from None
    plans_name = args.plans_name or default_plans_name(args.arch)
    try:
        path = plan_for_network(os.path.join(nnUNet_preprocessed, dataset), args.arch, args.configurations,
                                args.gpu_memory_gb, plans_name, args.source_plans)
    except ValueError as exc:  # PlanningError, or a network refusing the plans it was given
        raise SystemExit(f"nnunet-mamba plan: {exc}") from None
    print(f"wrote {path}\nnnU-Net's own trainer and predictor now build {args.arch} (preprocessed data is reused):\n"
          f"  nnUNetv2_train {dataset} CONFIG FOLD -p {plans_name}\n"
          f"  nnUNetv2_predict -i IN -o OUT -d {dataset} -c CONFIG -p {plans_name}\n"
          "nnU-Net compiles the network on GPUs (nnUNet_compile=f turns it off; see README).")
    return 0
