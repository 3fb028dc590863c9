"""Pretrained weights as the networks that take them know them (timm's ``pretrained_cfg``): where a checkpoint
comes from, what it must contain, and its verified state dict from the weights folder. Which network takes which
weights: :func:`nnunet_mamba.networks.registry.register_pretrained`; downloading them: :mod:`nnunet_mamba.pretrained`.

Folder: ``$NNUNET_MAMBA_WEIGHTS`` if set, else ``~/.cache/nnunet_mamba`` (also for a source checkout, whose
``pretrained/`` an editable install would otherwise fill with weights).
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PathLike = str | Path
WEIGHTS_DIR_ENV = "NNUNET_MAMBA_WEIGHTS"


@dataclass(frozen=True)
class PretrainedSpec:
    """A known checkpoint: where to get it and what it must contain."""

    name: str
    file_name: str
    urls: tuple[str, ...]
    manifest: str  # file under nnunet_mamba/data/: a JSON list of [key, shape] pairs of the weights
    sha256: str | None = None  # pinned once known; until then files are checked by their layout only
    # digests reported elsewhere for some upload of the file, not verified here: shown, never enforced
    reported_sha256: tuple[str, ...] = ()
    model_key: str = "model"  # the weights' entry in the checkpoint dict; other entries are ignored
    inert_globals: tuple[str, ...] = ()  # classes pickled beside the weights, loaded as plain dicts
    description: str = ""
    # what a network does with them (timm's pretrained_cfg): the convolution that reads the image (adapted to other
    # input channels) and the classifier's keys (never loaded into a segmentation network)
    first_conv: str = ""
    classifier: tuple[str, ...] = ()

    @property
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected state-dict keys (in checkpoint order) and their shapes."""
        return dict(_load_manifest(self.manifest))


@lru_cache(maxsize=None)
def _load_manifest(manifest: str) -> dict[str, tuple[int, ...]]:
    pairs = json.loads(files("nnunet_mamba").joinpath("data", manifest).read_text())
    return {key: tuple(shape) for key, shape in pairs}


def default_weights_dir() -> Path:
    """``$NNUNET_MAMBA_WEIGHTS``, else the user cache ``~/.cache/nnunet_mamba``."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nnunet_mamba"


def weights_file(spec: PretrainedSpec, weights_dir: PathLike | None = None) -> Path:
    """Where the weights ``spec`` live (whether or not they are there yet)."""
    folder = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    return folder / spec.file_name


def verify_checkpoint(path: PathLike, spec: PretrainedSpec, trust_pickle: bool | None = None,
                      label: str | None = None) -> dict[str, torch.Tensor]:
    """Load ``path`` and return its ``spec.model_key`` state dict if that has exactly the expected keys and shapes.

    Other top-level entries are tolerated. The file is loaded with ``weights_only=True``; ``trust_pickle`` allows
    full unpickling for files that hold other Python objects (``None``: as ``$NNUNET_MAMBA_TRUST_PICKLE`` says).
    Raises :class:`CheckpointError` (naming ``label``, default the path) for truncated or corrupt files, non-dicts,
    foreign checkpoints and layout mismatches.
    """
    from ..checkpoints import (TRUST_PICKLE_HINT, CheckpointError, UnsafeCheckpointError, check_state_dict,
                              load_checkpoint_file, trust_reason)

    label = label or str(path)
    try:
        checkpoint = load_checkpoint_file(path, spec.inert_globals, trust_reason(trust_pickle), label)
    except UnsafeCheckpointError as exc:
        raise CheckpointError(f"{label}: {exc} To load it anyway, {TRUST_PICKLE_HINT}, only if you trust its "
                              "source.") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{label}: {exc}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{label}: not a {spec.name} checkpoint: holds a {type(checkpoint).__name__}, "
                              f"not a dict with {spec.model_key!r}")
    if spec.model_key not in checkpoint:
        keys = ", ".join(map(str, list(checkpoint)[:8])) + (", ..." if len(checkpoint) > 8 else "")
        raise CheckpointError(f"{label}: not a {spec.name} checkpoint: no {spec.model_key!r} entry "
                              f"(top-level keys: {keys or 'none'})")
    state_dict = checkpoint[spec.model_key]
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{label}: {spec.model_key!r} holds a {type(state_dict).__name__}, not a state dict")
    check_state_dict(state_dict, spec.expected_shapes, f"{label}: {spec.name} weights")
    return state_dict


def load_state_dict(spec: PretrainedSpec, weights_dir: PathLike | None = None,
                    trust_pickle: bool | None = None) -> dict[str, torch.Tensor]:
    """The verified state dict of the pretrained weights ``spec``; ``FileNotFoundError`` (saying how to get them)
    if they have not been downloaded. ``trust_pickle=None`` follows ``$NNUNET_MAMBA_TRUST_PICKLE``: a file installed
    with ``--trust-pickle`` loads in ``nnUNetv2_train`` with ``NNUNET_MAMBA_TRUST_PICKLE=1``."""
    name = spec.name
    path = weights_file(spec, weights_dir)
    if not path.is_file():
        command = f"nnunet-mamba download-weights {name}"
        if weights_dir is not None:
            command += f" --dir {shlex.quote(str(weights_dir))}"
        raise FileNotFoundError(
            f"pretrained weights {name!r} not found at {path}. Download them with\n"
            f"    {command}\n"
            f"or, on a machine without internet, fetch {spec.urls[0]} elsewhere, copy it here and run\n"
            f"    {command} --from-file PATH\n"
            f"(the weights folder is ${WEIGHTS_DIR_ENV} if set, else ~/.cache/nnunet_mamba)")
    return verify_checkpoint(path, spec, trust_pickle)
