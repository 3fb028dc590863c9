"""Installing a file or folder atomically: nothing appears under its final name unless it was written completely.

The content is written into a temporary sibling named ``.<final name>.<pid>.<random>.partial`` (same folder, so the
rename is atomic on one file system), flushed to disk, then renamed onto the final name. While that runs, SIGTERM
(SLURM, ``docker stop``, ``kill``) is raised as an interrupt so that the temporary is removed; one left by SIGKILL
or a power loss is removed by the next install of the same name, once the process in its name is gone.

Used by the pretrained-weights download and by ``nnunet-mamba import-checkpoint``; needs nothing beyond the
standard library.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable, Iterator

PARTIAL_SUFFIX = ".partial"


def _partial_prefix(final: Path) -> str:
    return f".{final.name}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(final: Path) -> list[Path]:
    """Delete temporary files or folders of ``final`` left by an install that was killed (SIGKILL, power loss):
    those whose process (its pid is in the name) is gone. Returns what was removed."""
    removed = []
    prefix = _partial_prefix(final)
    for path in final.parent.glob(f"{prefix}*{PARTIAL_SUFFIX}"):
        pid = path.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue  # another install is writing it right now
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, so ``finally`` clauses run; a handler someone installed
    (our CLI's) stays, and outside the main thread signals stay as they are."""
    previous = None
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        try:
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def install_file(final: Path, write: Callable[[Path], None], mode: int = 0o644) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``final`` (it may also check what it wrote and raise), then
    flush it to disk, give it ``mode`` and rename it to ``final``. On any error or interrupt the temporary file is
    removed and ``final`` is untouched. The folder of ``final`` must exist."""
    remove_stale_partials(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_partial_prefix(final)}{os.getpid()}.", suffix=PARTIAL_SUFFIX,
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _sigterm_as_interrupt():
            write(tmp)
            _fsync(tmp)
            os.chmod(tmp, mode)  # mkstemp makes it owner-only
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def install_folder(final: Path, build: Callable[[Path], None]) -> Path:
    """Call ``build(tmp)`` on a new temporary folder beside ``final``, then rename it to ``final``. An existing
    ``final`` is moved aside first and deleted only once replaced (put back if the rename fails). On any error or
    interrupt the temporary folder is removed. The folder of ``final`` must exist."""
    remove_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(final)}{os.getpid()}.", suffix=PARTIAL_SUFFIX,
                                dir=final.parent))
    try:
        with _sigterm_as_interrupt():
            build(tmp)
            _replace_folder(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def _replace_folder(tmp: Path, final: Path) -> None:
    # a folder cannot be renamed onto an existing one: the old one goes aside until the new one is in place
    if not final.exists():
        os.rename(tmp, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(final)}{os.getpid()}.", suffix=".old", dir=final.parent))
    os.rename(final, old / final.name)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old / final.name, final)
        raise
    finally:
        if final.exists():
            shutil.rmtree(old)
