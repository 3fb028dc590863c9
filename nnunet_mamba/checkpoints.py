"""Checkpoint reading, checking and conversion: functions on files and dicts that need neither nnU-Net nor a network.

- :func:`load_checkpoint_file`: ``torch.load`` restricted to tensors and plain containers (``weights_only=True``),
  with errors that tell a truncated file from one holding arbitrary Python objects.
- :func:`state_dict_mismatch` / :func:`check_state_dict`: compare a state dict with expected keys and shapes.
- :func:`convert_checkpoint`: an nnU-Net checkpoint written by the original U-Mamba or Swin-UMamba repositories
  (their vendored nnU-Net of the 2.2 era) into one that nnU-Net 2.8 and our trainers load.
- :func:`convert_flemme_state_dict`: the original Flemme's SeM Swin-U / Mamba-U weights renamed into ours.
- :func:`convert_swin_umamba_state_dict`: the original Swin-UMamba's head keys (``out_layers.*``) renamed to ours
  (``decoder.seg_layers.*``, which nnU-Net's ``-pretrained_weights`` leaves out when fine-tuning).
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import torch

PathLike = str | Path


class CheckpointError(ValueError):
    """A checkpoint file or dict is unreadable, foreign, or does not have the expected layout."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled Python objects that ``weights_only`` loading refuses (their names are in ``globals``)."""

    def __init__(self, message: str, unsafe_globals: Sequence[str]) -> None:
        super().__init__(message)
        self.globals = list(unsafe_globals)


class _InertObject:
    """Stand-in for an allowlisted class during ``weights_only`` loading.

    The restricted unpickler builds an allowlisted class with ``cls.__new__``; ours returns a plain ``OrderedDict``,
    so dict-like training state (such as a yacs config) loads as data and none of the original class's code runs.
    """

    def __new__(cls, *args: Any) -> OrderedDict:
        return OrderedDict()


TRUST_PICKLE_ENV = "NNUNET_MAMBA_TRUST_PICKLE"
# How to opt in to full unpickling, for messages: the flag on our commands, the variable where no flag reaches
# (nnUNetv2_train / nnUNetv2_predict building our trainers).
TRUST_PICKLE_HINT = f"pass --trust-pickle (or set {TRUST_PICKLE_ENV}=1 for nnUNetv2_train / nnUNetv2_predict)"


def trust_pickle_from_env() -> bool:
    """``True`` if ``$NNUNET_MAMBA_TRUST_PICKLE`` opts in to full unpickling (``1``, ``true``, ``yes``)."""
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def trust_reason(trust_pickle: bool | None) -> str | None:
    """Why full unpickling is allowed (for :func:`load_checkpoint_file`'s ``unsafe_reason``), or ``None``: an explicit
    ``trust_pickle`` (the ``--trust-pickle`` flag) decides; ``None`` leaves it to ``$NNUNET_MAMBA_TRUST_PICKLE``."""
    if trust_pickle:
        return "--trust-pickle was given"
    if trust_pickle is None and trust_pickle_from_env():
        return f"{TRUST_PICKLE_ENV}=1 is set"
    return None


def _numpy_safe_globals() -> list[Any]:
    """The numpy types nnU-Net's checkpoints hold (its training log keeps numpy scalars): reconstructing a scalar
    from its dtype and raw bytes runs no code from the file, so these are safe under ``weights_only``."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16,
                                          np.int8, np.uint8, np.bool_)]
    return [core.multiarray.scalar, np.dtype, *dtypes]


def _reason(exc: BaseException) -> str:
    """The exception's own reason, without torch's advice to retry with ``weights_only=False``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    own = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line
           and "trusted source" not in line and "Check the documentation" not in line]
    return f"{type(exc).__name__}: {own[0]}" if own else type(exc).__name__


def _pickle_globals(path: PathLike) -> list[str]:
    """Globals a plain pickle file imports, read from its opcodes without executing any (torch's restricted
    unpickler stops at opcodes it does not know, e.g. protocol 4's STACK_GLOBAL, before naming the global)."""
    found, strings = [], []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle, or a damaged one: what was read so far
        pass
    return [name for name in dict.fromkeys(found) if not name.startswith(("torch.", "collections.OrderedDict"))]


def _unsafe_globals(path: PathLike, exc: BaseException) -> list[str]:
    """Globals in the file that ``weights_only`` refuses; empty if the file is no readable checkpoint."""
    # Old-format (non-zip) files: torch's scanner reads zip archives only, but its refusal names the global.
    named = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    try:
        scanned = list(finder(str(path))) if finder is not None else []
    except Exception:  # not a zip archive, or a corrupt one: whatever the scanner raises
        scanned = []
    return scanned or named or _pickle_globals(path)


def load_checkpoint_file(path: PathLike, inert_globals: Sequence[str] = (), unsafe_reason: str | None = None,
                         label: str | None = None) -> Any:
    """``torch.load(path)`` onto the CPU with ``weights_only=True``.

    Tensors, plain containers and numpy scalars (as in nnU-Net's checkpoints) load that way. ``inert_globals`` names
    classes (``"module.Class"``) to load as plain dicts instead of refusing them. A file that holds other Python
    objects is refused with :class:`UnsafeCheckpointError` unless ``unsafe_reason`` says why it may be unpickled
    fully (``weights_only=False``, which can run code from the file; the caller's explicit opt-in); the reason is
    then printed. Truncated or corrupt files raise :class:`CheckpointError`; a missing file ``FileNotFoundError``.
    Messages do not name the file, except the printed note, which uses ``label`` (default: the path).
    """
    allowed = _numpy_safe_globals() + [(_InertObject, name) for name in inert_globals]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as exc:  # the restricted unpickler runs no code from the file, so any failure means "bad file"
        unsafe = _unsafe_globals(path, exc) if isinstance(exc, pickle.UnpicklingError) else []
        if not unsafe:
            raise CheckpointError(f"not a readable PyTorch checkpoint (truncated or corrupt?): {_reason(exc)}") \
                from None
        if unsafe_reason is None:
            raise UnsafeCheckpointError(
                f"holds pickled Python objects beyond tensors and plain containers ({', '.join(unsafe)}); "
                "refusing to unpickle them, as that can run code from the file.", unsafe) from None
    print(f"note: {label or path} holds Python objects beyond tensors ({', '.join(unsafe)}); loading it with "
          f"weights_only=False because {unsafe_reason}", file=sys.stderr)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # full unpickling can fail in any way the pickled objects' code chooses
        raise CheckpointError(f"cannot be unpickled: {_reason(exc)}") from exc


def _listing(items: Sequence[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def state_dict_mismatch(state_dict: Mapping[str, Any], expected: Mapping[str, Sequence[int]],
                        limit: int = 5) -> str | None:
    """``None`` if ``state_dict`` has exactly the ``expected`` keys with those shapes, else what differs: counts of
    missing, unexpected, mis-shaped and non-tensor entries with the first ``limit`` keys of each."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    not_tensors = [k for k in expected if k in state_dict and not isinstance(state_dict[k], torch.Tensor)]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k])}" for k in expected
                   if k in state_dict and k not in not_tensors and tuple(state_dict[k].shape) != tuple(expected[k])]
    problems = [f"{len(items)} {what}: {_listing(items, limit)}" for what, items in
                (("missing", missing), ("unexpected", unexpected), ("not tensors", not_tensors),
                 ("with wrong shape", wrong_shape)) if items]
    if not problems:
        return None
    return f"{len(state_dict)} entries, {len(expected)} expected; " + "; ".join(problems)


def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, Sequence[int]], what: str) -> None:
    """Raise :class:`CheckpointError` naming ``what`` unless ``state_dict`` matches ``expected`` keys and shapes."""
    mismatch = state_dict_mismatch(state_dict, expected)
    if mismatch:
        raise CheckpointError(f"{what} do not match the expected layout: {mismatch}")


# Original trainer name -> (network family, the name of our trainer). Our trainers keep the original names;
# NoAMP only switched off mixed precision in training, so its models are plain U-Mamba Enc models.
ORIGINAL_TRAINERS: dict[str, tuple[str, str]] = {
    "nnUNetTrainerUMambaBot": ("umamba", "nnUNetTrainerUMambaBot"),
    "nnUNetTrainerUMambaEnc": ("umamba", "nnUNetTrainerUMambaEnc"),
    "nnUNetTrainerUMambaEncNoAMP": ("umamba", "nnUNetTrainerUMambaEnc"),
    "nnUNetTrainerSwinUMamba": ("swin_umamba", "nnUNetTrainerSwinUMamba"),
    "nnUNetTrainerSwinUMambaD": ("swin_umamba", "nnUNetTrainerSwinUMambaD"),
    "nnUNetTrainerSwinUMambaScratch": ("swin_umamba", "nnUNetTrainerSwinUMambaScratch"),
    "nnUNetTrainerSwinUMambaDScratch": ("swin_umamba", "nnUNetTrainerSwinUMambaDScratch"),
}

UMAMBA_DUPLICATE_PREFIX = "decoder.encoder."
# nnU-Net 2.6 removed this trainer constructor argument; 2.8 cannot build a trainer from init_args holding it.
REMOVED_INIT_ARGS = ("unpack_dataset",)
REQUIRED_NNUNET_KEYS = ("network_weights", "init_args", "trainer_name")


def convert_umamba_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original U-Mamba decoder keeps a reference to the encoder, so its state dict holds every ``encoder.*``
    tensor a second time under ``decoder.encoder.*``; ours does not. Drop those copies after checking that each
    equals its ``encoder.*`` twin (so nothing trained is lost). Order and all other entries are kept."""
    converted: dict[str, torch.Tensor] = {}
    differing, orphans = [], []
    for key, value in state_dict.items():
        if not key.startswith(UMAMBA_DUPLICATE_PREFIX):
            converted[key] = value
            continue
        twin = state_dict.get("encoder." + key[len(UMAMBA_DUPLICATE_PREFIX):])
        if twin is None:
            orphans.append(key)
        elif twin.shape != value.shape or not torch.equal(twin, value):
            differing.append(key)
    if differing or orphans:
        parts = [f"{len(items)} {what}: {_listing(items, 5)}" for what, items in
                 (("differ from their encoder.* twin", differing), ("have no encoder.* twin", orphans)) if items]
        raise CheckpointError(f"U-Mamba state dict: {UMAMBA_DUPLICATE_PREFIX}* entries are expected to duplicate "
                              f"encoder.*, but {'; '.join(parts)}")
    return converted


# The original Swin-UMamba's heads -> ours (Swin-UMamba-dagger's are decoder.seg_layers.* in both)
SWIN_UMAMBA_HEAD_PREFIXES = (("out_layers.", "decoder.seg_layers."),)


def convert_swin_umamba_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original Swin-UMamba's state dict in our layout: its heads ``out_layers.*`` become
    ``decoder.seg_layers.*`` (nnU-Net's name for segmentation heads); order, values and all other keys are kept."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for old, new in SWIN_UMAMBA_HEAD_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if key in converted:
            raise CheckpointError(f"Swin-UMamba state dict: {key} is there under both its original and our name")
        converted[key] = value
    return converted


def convert_checkpoint(checkpoint: Mapping[str, Any], trainer_name: str | None = None) -> dict[str, Any]:
    """A new checkpoint dict for nnU-Net 2.8 from one of the original repositories' nnU-Net checkpoints.

    ``network_weights`` is converted for its network family, the removed ``init_args`` are dropped, and
    ``trainer_name`` becomes our trainer's (or ``trainer_name`` if given). Every other entry is kept as it is, so
    training can also be continued. The input is not modified; converting a converted checkpoint changes nothing.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"not an nnU-Net checkpoint: a {type(checkpoint).__name__}, not a dict")
    missing = [k for k in REQUIRED_NNUNET_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"not an nnU-Net checkpoint: no {', '.join(missing)} "
                              f"(top-level keys: {_listing([str(k) for k in checkpoint], 8)})")
    if not isinstance(checkpoint["init_args"], Mapping):
        raise CheckpointError(f"not an nnU-Net checkpoint: init_args is a {type(checkpoint['init_args']).__name__}")
    original = checkpoint["trainer_name"]
    if original not in ORIGINAL_TRAINERS:
        raise CheckpointError(f"trainer {original!r} is not one of the U-Mamba / Swin-UMamba trainers this converts: "
                              f"{', '.join(ORIGINAL_TRAINERS)}")
    family, ours = ORIGINAL_TRAINERS[original]
    weights = checkpoint["network_weights"]
    # callers check the result against the network (check_state_dict)
    weights = convert_umamba_state_dict(weights) if family == "umamba" else convert_swin_umamba_state_dict(weights)
    init_args = {k: v for k, v in checkpoint["init_args"].items() if k not in REMOVED_INIT_ARGS}
    return {**checkpoint, "network_weights": weights, "init_args": init_args, "trainer_name": trainer_name or ours}


# ---------------------------------------------------------------------------------------------------------------
# Flemme (wlsdzyzl/flemme, first public release, commit 0be9dade): SeM Swin-U and Mamba-U state dicts

# Module containers, original -> ours (flemme/model/encoder/swin.py, vmamba.py; a stage is a
# MultipleBuildingBlocks, whose blocks sit under ``building_blocks.<j>``)
_FLEMME_CONTAINERS = (
    (r"encoder\.patch_emb\.conv\.", "encoder.patch_embed.proj."),
    (r"encoder\.(?:d_trans|d_ssm)\.(\d+)\.building_blocks\.(\d+)\.", r"encoder.stages.\1.\2."),
    (r"encoder\.middle\.(\d+)\.building_blocks\.(\d+)\.", r"encoder.middle.\1.\2."),
    (r"encoder\.down\.(\d+)\.(reduction|norm)\.", r"encoder.downsamples.\1.\2."),
    (r"decoder\.up\.(\d+)\.(expand|norm)\.", r"decoder.upsamples.\1.\2."),
    (r"decoder\.(?:u_trans|u_ssm)\.(\d+)\.building_blocks\.(\d+)\.", r"decoder.stages.\1.\2."),
    (r"decoder\.patch_recov\.expand\.expand\.", "decoder.seg_layers.recovery.expand.expand."),
    (r"decoder\.patch_recov\.conv\.", "decoder.seg_layers.recovery.proj."),
)
# Inside a SwinTransformerBlock / VMambaBlock (flemme/block/swin.py, vmamba.py, common.py): norms are NormBlocks
# holding ``norm``, MLPs a MultiLayerPerceptionBlock of DenseBlocks (``mlp.<i>.linear``), the Swin width change a
# Linear ``dense``, the Mamba one a DenseBlock ``fc``
_FLEMME_BLOCK_PARTS = (
    (r"norm([12])\.norm\.", r"norm\1."),
    (r"atten\.(qkv|proj)\.", r"attn.\1."),
    (r"atten\.relative_position_bias_table$", "attn.relative_position_bias_table"),
    (r"mlp\.mlp\.0\.linear\.", "mlp.0."),
    (r"mlp\.mlp\.1\.linear\.", "mlp.2."),
    (r"dense\.", "fc."),
    (r"fc\.linear\.", "fc."),
    (r"(in_proj\.|out_proj\.|conv\.|x_proj_weight$|dt_projs_weight$|dt_projs_bias$|A_logs$|Ds$)", r"\1"),
)
# buffers the original keeps in its state dict and we compute
_FLEMME_BUFFERS = re.compile(r"(atten\.relative_position_index|atten_mask)$")


def convert_flemme_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the state dict of an original Flemme SeM network with Swin or VMamba blocks (Swin-U, Mamba-U:
    ``SwinUNetEncoder``/``SwinUNetDecoder``, ``VMambaUNetEncoder``/``VMambaUNetDecoder``, plain building blocks,
    no ``final`` decoder layers) into ours, :class:`nnunet_mamba.networks.flemme.FlemmeNet` built with the same
    widths, strides and block counts (e.g. :func:`~nnunet_mamba.networks.flemme.flemme_table3`).

    Tensors are renamed, never changed: our blocks compute the original's function (MLP activations, patch
    merging order), and the window attention's index table and mask buffers are dropped (we build them). The
    layout was established by reading the original's code, not by loading one of its checkpoints. Other Flemme
    networks (the convolution family, residual building blocks, H-SeM's side blocks and combination) are not
    covered: a key this function cannot place raises :class:`CheckpointError`.
    """
    converted: dict[str, torch.Tensor] = {}
    unplaced = []
    for key, value in state_dict.items():
        if _FLEMME_BUFFERS.search(key):
            continue
        for pattern, replacement in _FLEMME_CONTAINERS:
            match = re.match(pattern, key)
            if match:
                break
        else:
            unplaced.append(key)
            continue
        head, rest = match.expand(replacement), key[match.end():]
        if "stages." in head or "middle." in head:
            for part, ours in _FLEMME_BLOCK_PARTS:
                block_match = re.match(part, rest)
                if block_match:
                    rest = block_match.expand(ours) + rest[block_match.end():]
                    break
            else:
                unplaced.append(key)
                continue
        converted[head + rest] = value
    if unplaced:
        raise CheckpointError(f"{len(unplaced)} key(s) of the Flemme state dict have no place in our network "
                              f"(only SeM Swin-U / Mamba-U with plain blocks convert): {_listing(unplaced, 5)}")
    return converted
