"""Atomic writes: everything a user keeps is written to a temporary sibling and renamed into place.

A reader therefore sees either the old complete folder or the new complete folder, never a half
written one, whatever kills the process in between (the temporary folder is left behind as
``.NAME.tmp-*`` and cleaned up by the next write).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

COMPLETE_MARKER = ".ft_magics_complete"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created(path: Path, directory: bool, umask: Optional[int] = None) -> None:
    """Give a file or folder the mode an ordinary ``open``/``mkdir`` would have given it: ``mkstemp`` and
    ``mkdtemp`` make them private (0600 / 0700), and safetensors writes its weights 0600, so every saved adapter
    and export was unreadable to a server or another user where the umask would have allowed it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~(_umask() if umask is None else umask))


def writable_dir(path: os.PathLike | str, what: str, doing: Optional[str] = None) -> Path:
    """``path``, made with its parents and checked writable, or a usage error saying ``what`` was to be
    written there (``doing``: what was to be done in it instead, e.g. "delete 'bot'") - a read-only or missing
    mount found before any work, not at the first save or half-way through a delete."""
    from ..errors import FtUsageError

    path = Path(path)
    head = f"cannot {doing} in {path}" if doing else f"cannot write {what} to {path}"
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # mkdir would say only "File exists"
        raise FtUsageError(f"{head}: {blocking} is a file, not a folder. Give a folder's path (a new one is made).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ft_magics-probe-"):
            pass
    except OSError as exc:
        raise FtUsageError(f"{head}: {exc.strerror or exc}. " + (
            "Make the folder writable (nothing was changed)." if doing else "Choose a folder you can write to.")) from None
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE); False where that is not available
    (another system, an old kernel or libc, a file system without it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def recover_replaced(target: Path) -> None:
    """Tidy what a replace killed part-way left beside ``target``: a ``.NAME.old-PID`` copy of a process that is
    gone is put back where ``target`` is missing (killed between moving the old folder aside and moving the new
    one in: both were invisible) and removed where ``target`` is there (killed before the old copy was
    deleted: a hidden whole copy, never cleaned)."""
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue  # another process is replacing it right now
        if not target.exists() and (old / COMPLETE_MARKER).exists():
            try:
                os.rename(old, target)
                continue
            except OSError:
                pass
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: os.PathLike | str) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``target`` in one step: an atomic exchange of the
    two where the system has one (the old folder is then the temporary one, removed after), else two renames."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    recover_replaced(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        umask = _umask()  # read once for the folder's files
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _as_if_created(f, f.is_dir(), umask)  # safetensors writes its files 0600 whatever the umask
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        _as_if_created(tmp, True, umask)
        if target.exists() and _exchange(tmp, target):  # killed after it: the old copy is a stale .tmp-*
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_dir(folder: os.PathLike | str, name: Optional[str] = None) -> None:
    """Remove ``folder`` in one step: renamed aside to a sibling (moving a folder to another parent needs that
    parent's write permission too) named as :func:`atomic_dir` clears stale ones for ``name`` (default: the
    folder's own name), then emptied, so a file that cannot be removed never leaves it half there."""
    import time

    folder = Path(folder)
    aside = folder.parent / f".{name or folder.name}.tmp-deleted-{os.getpid()}-{time.time_ns()}"
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, fsync it, and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _as_if_created(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: os.PathLike | str, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
