"""Write-then-rename, so a crash leaves the old file or the new one, never half of one; the
check that an output path may be written at all; and unnamed files' errors named."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from export.errors import InputError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success rename it over `dest`, else delete it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:  # a read-only folder: name the output the user gave
        raise OSError(exc.errno, exc.strerror, str(dest)) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts get ordinary permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except OSError as exc:
        if exc.errno is not None:
            if str(tmp_path) in (exc.filename, exc.filename2):  # not the temporary name
                raise OSError(exc.errno, exc.strerror, str(dest)) from None
            raise
        # numpy's tofile reports a short write with no errno: name the file and the cause.
        st = os.statvfs(dest.parent)
        code = errno.ENOSPC if st.f_bavail * st.f_frsize < (1 << 20) else errno.EIO
        raise OSError(code, os.strerror(code), str(dest)) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def _same_inode(a: Path, b: Path) -> bool:
    """Two names of one file (a hard link, a bind mount): the atomic write would replace
    the output's name only, but the user named an input as the output."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either one not there (yet)
        return False


def check_output(out: str | os.PathLike, flag: str, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, before any work, an output path that resolves to one of the command's inputs
    (however spelled: relative, absolute, through a symlink, a hard link) or that cannot be
    a file."""
    target = Path(os.path.realpath(out))
    for name, path in inputs.items():
        if path is None:
            continue
        source = Path(os.path.realpath(path))
        if source == target or _same_inode(source, target):
            raise InputError(f"{flag} {out}: is the same file as {name} {path}; refusing to "
                             f"overwrite an input")
        if source.is_dir() and target.is_file() and source in target.parents:
            raise InputError(f"{flag} {out}: is a file inside {name} {path}; refusing to "
                             f"overwrite an input")
    if target.is_dir():
        raise InputError(f"{flag} {out}: is a folder; expected a file path")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {out}: cannot write into {existing} (read-only or no "
                         f"permission)")


@contextlib.contextmanager
def naming(folder: str | os.PathLike) -> Iterator[None]:
    """An OSError (a full disk) from an unnamed file names the folder it lies in: the CLI's
    one line would otherwise say only "output"."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(folder)) from None
