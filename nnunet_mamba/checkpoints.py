"""Checkpoint reading, checking and conversion: functions on files and dicts that need neither nnU-Net nor a network.

- :func:`load_checkpoint_file`: ``torch.load`` restricted to tensors and plain containers (``weights_only=True``),
  with errors that tell a truncated file from one holding arbitrary Python objects.
- :func:`state_dict_mismatch` / :func:`check_state_dict`: compare a state dict with expected keys and shapes.
- :func:`convert_checkpoint`: an nnU-Net checkpoint written by the original U-Mamba or Swin-UMamba repositories
  (their vendored nnU-Net of the 2.2 era) into one that nnU-Net 2.8 and our trainers load.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

PathLike = Union[str, Path]


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

    def __new__(cls, *args: Any) -> "OrderedDict":
        return OrderedDict()


TRUST_PICKLE_ENV = "NNUNET_MAMBA_TRUST_PICKLE"
# How to opt in to full unpickling, for messages: the flag on our commands, the variable where no flag reaches
# (nnUNetv2_train / nnUNetv2_predict building our trainers).
TRUST_PICKLE_HINT = f"pass --trust-pickle (or set {TRUST_PICKLE_ENV}=1 for nnUNetv2_train / nnUNetv2_predict)"


def trust_pickle_from_env() -> bool:
    """``True`` if ``$NNUNET_MAMBA_TRUST_PICKLE`` opts in to full unpickling (``1``, ``true``, ``yes``)."""
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def trust_reason(trust_pickle: Optional[bool]) -> Optional[str]:
    """Why full unpickling is allowed (for :func:`load_checkpoint_file`'s ``unsafe_reason``), or ``None``: an explicit
    ``trust_pickle`` (the ``--trust-pickle`` flag) decides; ``None`` leaves it to ``$NNUNET_MAMBA_TRUST_PICKLE``."""
    if trust_pickle:
        return "--trust-pickle was given"
    if trust_pickle is None and trust_pickle_from_env():
        return f"{TRUST_PICKLE_ENV}=1 is set"
    return None


def _numpy_safe_globals() -> List[Any]:
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


def _pickle_globals(path: PathLike) -> List[str]:
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


def _unsafe_globals(path: PathLike, exc: BaseException) -> List[str]:
    """Globals in the file that ``weights_only`` refuses; empty if the file is no readable checkpoint."""
    # Old-format (non-zip) files: torch's scanner reads zip archives only, but its refusal names the global.
    named = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    try:
        scanned = list(finder(str(path))) if finder is not None else []
    except Exception:  # not a zip archive, or a corrupt one: whatever the scanner raises
        scanned = []
    return scanned or named or _pickle_globals(path)


def load_checkpoint_file(path: PathLike, inert_globals: Sequence[str] = (), unsafe_reason: Optional[str] = None,
                         label: Optional[str] = None) -> Any:
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
                        limit: int = 5) -> Optional[str]:
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
ORIGINAL_TRAINERS: Dict[str, Tuple[str, str]] = {
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


def convert_umamba_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The original U-Mamba decoder keeps a reference to the encoder, so its state dict holds every ``encoder.*``
    tensor a second time under ``decoder.encoder.*``; ours does not. Drop those copies after checking that each
    equals its ``encoder.*`` twin (so nothing trained is lost). Order and all other entries are kept."""
    converted: Dict[str, torch.Tensor] = {}
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


def convert_checkpoint(checkpoint: Mapping[str, Any], trainer_name: Optional[str] = None) -> Dict[str, Any]:
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
    # Swin-UMamba's layout is already ours; callers check it against the network (check_state_dict).
    weights = convert_umamba_state_dict(weights) if family == "umamba" else dict(weights)
    init_args = {k: v for k, v in checkpoint["init_args"].items() if k not in REMOVED_INIT_ARGS}
    return {**checkpoint, "network_weights": weights, "init_args": init_args, "trainer_name": trainer_name or ours}
