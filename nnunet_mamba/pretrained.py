"""Pretrained weights, in the spirit of timm's registry: which checkpoints we know, where they live, how to check them.

A file only ever appears under its final name after it has been verified (fetched into a temporary file beside
it, checked, then renamed), so a file found there is complete and has the expected layout.

Folder: ``$NNUNET_MAMBA_WEIGHTS`` if set, else ``~/.cache/nnunet_mamba`` (also for a source checkout, whose
``pretrained/`` an editable install would otherwise fill with weights).

Only the registry is imported at start-up (``nnunet-mamba --help`` lists its names); torch is imported on use.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple, Union

if TYPE_CHECKING:
    import torch

PathLike = Union[str, Path]
WEIGHTS_DIR_ENV = "NNUNET_MAMBA_WEIGHTS"


class DownloadError(RuntimeError):
    """None of a checkpoint's URLs gave a file that passed verification."""


@dataclass(frozen=True)
class PretrainedSpec:
    """A known checkpoint: where to get it and what it must contain."""

    name: str
    file_name: str
    urls: Tuple[str, ...]
    manifest: str  # file under nnunet_mamba/data/: a JSON list of [key, shape] pairs of the weights
    sha256: Optional[str] = None  # pinned once known; until then files are checked by their layout only
    # digests reported elsewhere for some upload of the file, not verified here: shown, never enforced
    reported_sha256: Tuple[str, ...] = ()
    model_key: str = "model"  # the weights' entry in the checkpoint dict; other entries are ignored
    inert_globals: Tuple[str, ...] = ()  # classes pickled beside the weights, loaded as plain dicts
    description: str = ""

    @property
    def expected_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Expected state-dict keys (in checkpoint order) and their shapes."""
        return dict(_load_manifest(self.manifest))


@lru_cache(maxsize=None)
def _load_manifest(manifest: str) -> Dict[str, Tuple[int, ...]]:
    pairs = json.loads(files("nnunet_mamba").joinpath("data", manifest).read_text())
    return {key: tuple(shape) for key, shape in pairs}


_REGISTRY: Dict[str, PretrainedSpec] = {}


def register_pretrained(spec: PretrainedSpec) -> PretrainedSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"pretrained weights {spec.name!r} are already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_pretrained() -> List[str]:
    """Names of all registered pretrained checkpoints, sorted."""
    return sorted(_REGISTRY)


def get_pretrained_spec(name: str) -> PretrainedSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown pretrained weights {name!r}; known: {', '.join(list_pretrained())}") from None


register_pretrained(PretrainedSpec(
    name="vmamba-tiny",
    file_name="vssmtiny_dp01_ckpt_epoch_292.pth",
    urls=("https://github.com/MzeroMiko/VMamba/releases/download/%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth",
          "https://github.com/MzeroMiko/VMamba/releases/download/%2320240218/vssmtiny_dp01_ckpt_epoch_292.pth"),
    manifest="vmamba_tiny_v0_keys.json",
    # Early uploads pickle the yacs training config beside the weights; loading it as a plain dict needs neither
    # yacs nor unrestricted unpickling.
    inert_globals=("yacs.config.CfgNode",),
    # Not pinned: the release was re-uploaded (with and without the config), so no single digest is authoritative,
    # and no machine of ours could download it. A third-party provisioning guide records this digest for the
    # #v0cls upload (91,649,482 bytes); `download-weights` says whether a file matches it.
    reported_sha256=("dbc0cc4f5ec0e45db5fba7c939d2c7d9b617e891ac10766912a8d604c37c5e47",),
    description="VMamba-T v0, ImageNet-1k (82.2% top-1): the encoder initialisation of Swin-UMamba",
))


def default_weights_dir() -> Path:
    """``$NNUNET_MAMBA_WEIGHTS``, else the user cache ``~/.cache/nnunet_mamba``."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nnunet_mamba"


def weights_path(name: str, weights_dir: Optional[PathLike] = None) -> Path:
    """Where the weights ``name`` live (whether or not they are there yet)."""
    folder = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    return folder / get_pretrained_spec(name).file_name


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(path: PathLike, spec: PretrainedSpec, trust_pickle: Optional[bool] = None,
                      label: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Load ``path`` and return its ``spec.model_key`` state dict if that has exactly the expected keys and shapes.

    Other top-level entries are tolerated. The file is loaded with ``weights_only=True``; ``trust_pickle`` allows
    full unpickling for files that hold other Python objects (``None``: as ``$NNUNET_MAMBA_TRUST_PICKLE`` says).
    Raises :class:`CheckpointError` (naming ``label``, default the path) for truncated or corrupt files, non-dicts,
    foreign checkpoints and layout mismatches.
    """
    from .checkpoints import (TRUST_PICKLE_HINT, CheckpointError, UnsafeCheckpointError, check_state_dict,
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


def _install(final: Path, spec: PretrainedSpec, fetch: Callable[[Path], None], label: str,
             trust_pickle: Optional[bool]) -> Path:
    """``fetch`` into a temporary file beside ``final`` and verify it before it takes the final name
    (:func:`nnunet_mamba.files.install_file`), so ``final`` never holds a partial or unverified file."""
    from .files import install_file

    def fetch_and_verify(tmp: Path) -> None:
        fetch(tmp)
        verify_checkpoint(tmp, spec, trust_pickle, label)

    return install_file(final, fetch_and_verify)  # 0o644: weights are no secret


def download_weights(name: str, force: bool = False, from_file: Optional[PathLike] = None, progress: bool = True,
                     weights_dir: Optional[PathLike] = None, trust_pickle: Optional[bool] = None) -> Path:
    """Fetch the weights ``name`` into the weights folder and return their path.

    Tries each URL in turn (``from_file``: copies that local file instead, for machines without internet); the
    result is verified (sha256 when pinned, keys and shapes always) before it takes its final name. An existing
    file is verified and kept unless ``force`` (with ``from_file``: only if it is the same file, byte for byte).
    Raises :class:`CheckpointError` for a bad existing or local file, :class:`DownloadError` when no URL gave a good
    file. A weights folder this call created is removed again if nothing was installed.
    """
    from .checkpoints import CheckpointError

    spec = get_pretrained_spec(name)
    final = weights_path(name, weights_dir)
    source = Path(from_file).expanduser() if from_file is not None else None
    if source is not None and not source.is_file():
        raise FileNotFoundError(f"--from-file {source}: no such file")
    if final.exists() and not force:
        if source is not None and file_sha256(source) != file_sha256(final):
            raise CheckpointError(f"{final} is already installed and differs from --from-file {source}; "
                                  "add --force to replace it with that file")
        try:
            verify_checkpoint(final, spec, trust_pickle)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}\nthe existing file is bad; replace it with --force (force=True)") from None
        return final
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _fetch_and_install(name, spec, final, source, progress, trust_pickle)
    finally:
        if not final.exists():
            for folder in created:  # innermost first; only folders this call made, and only if empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def _fetch_and_install(name: str, spec: PretrainedSpec, final: Path, source: Optional[Path], progress: bool,
                       trust_pickle: Optional[bool]) -> Path:
    import torch

    from .checkpoints import CheckpointError

    if source is not None:

        def copy(tmp: Path) -> None:
            shutil.copyfile(source, tmp)
            if spec.sha256 is not None:
                digest = file_sha256(tmp)
                if digest != spec.sha256:
                    raise CheckpointError(f"{source}: sha256 {digest} is not the published {spec.sha256}")
        return _install(final, spec, copy, str(source), trust_pickle)

    failures = []
    for url in spec.urls:
        print(f"downloading {url}\n  -> {final}", file=sys.stderr)
        try:
            # download_url_to_file shows the progress bar and checks the sha256 when it is pinned
            return _install(final, spec, lambda tmp: torch.hub.download_url_to_file(
                url, str(tmp), hash_prefix=spec.sha256, progress=progress), url, trust_pickle)
        except (OSError, RuntimeError, CheckpointError) as exc:  # URLError/HTTPError are OSErrors; bad hash: Runtime
            print(f"  failed: {exc}", file=sys.stderr)
            failures.append(f"  {url}: {exc}")
    raise DownloadError(f"could not get {name!r} from any of its {len(spec.urls)} URL(s):\n" + "\n".join(failures)
                        + f"\nOn a machine without internet, fetch {spec.file_name} elsewhere and run "
                          f"`nnunet-mamba download-weights {name} --from-file PATH`.")


def load_pretrained_state_dict(name: str, weights_dir: Optional[PathLike] = None,
                               trust_pickle: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """The verified state dict of the pretrained weights ``name``; ``FileNotFoundError`` (saying how to get them)
    if they have not been downloaded. ``trust_pickle=None`` follows ``$NNUNET_MAMBA_TRUST_PICKLE``: a file installed
    with ``--trust-pickle`` loads in ``nnUNetv2_train`` with ``NNUNET_MAMBA_TRUST_PICKLE=1``."""
    spec = get_pretrained_spec(name)
    path = weights_path(name, weights_dir)
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
