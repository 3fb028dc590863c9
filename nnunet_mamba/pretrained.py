"""Downloading pretrained weights into the weights folder, by name (``nnunet-mamba download-weights NAME``).

Which weights exist, and which network takes them, the networks say (:func:`nnunet_mamba.networks.list_pretrained`,
:mod:`nnunet_mamba.networks.weights`). A file only ever appears under its final name after it has been verified
(fetched into a temporary file beside it, checked, then renamed), so a file found there is complete and has the
expected layout.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Callable

from .files import install_file
from .networks import get_pretrained_spec
from .networks.weights import PathLike, PretrainedSpec, load_state_dict, verify_checkpoint, weights_file

if TYPE_CHECKING:
    import torch


class DownloadError(RuntimeError):
    """None of a checkpoint's URLs gave a file that passed verification."""


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _install(final: Path, spec: PretrainedSpec, fetch: Callable[[Path], None], label: str,
             trust_pickle: bool | None) -> Path:
    """``fetch`` into a temporary file beside ``final`` and verify it before it takes the final name
    (:func:`nnunet_mamba.files.install_file`), so ``final`` never holds a partial or unverified file."""
    def fetch_and_verify(tmp: Path) -> None:
        fetch(tmp)
        verify_checkpoint(tmp, spec, trust_pickle, label)

    return install_file(final, fetch_and_verify)  # 0o644: weights are no secret


def download_weights(name: str, force: bool = False, from_file: PathLike | None = None, progress: bool = True,
                     weights_dir: PathLike | None = None, trust_pickle: bool | None = None) -> Path:
    """Fetch the weights ``name`` into the weights folder and return their path.

    Tries each URL in turn (``from_file``: copies that local file instead, for machines without internet); the
    result is verified (sha256 when pinned, keys and shapes always) before it takes its final name. An existing
    file is verified and kept unless ``force`` (with ``from_file``: only if it is the same file, byte for byte).
    Raises :class:`CheckpointError` for a bad existing or local file, :class:`DownloadError` when no URL gave a good
    file. A weights folder this call created is removed again if nothing was installed.
    """
    from .checkpoints import CheckpointError

    spec = get_pretrained_spec(name)
    final = weights_file(spec, weights_dir)
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


def _fetch_and_install(name: str, spec: PretrainedSpec, final: Path, source: Path | None, progress: bool,
                       trust_pickle: bool | None) -> Path:
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


def weights_path(name: str, weights_dir: PathLike | None = None) -> Path:
    """Where the weights ``name`` live (whether or not they are there yet)."""
    return weights_file(get_pretrained_spec(name), weights_dir)


def load_pretrained_state_dict(name: str, weights_dir: PathLike | None = None,
                               trust_pickle: bool | None = None) -> dict[str, torch.Tensor]:
    """The verified state dict of the downloaded weights ``name`` (see
    :func:`nnunet_mamba.networks.weights.load_state_dict`)."""
    return load_state_dict(get_pretrained_spec(name), weights_dir, trust_pickle)
