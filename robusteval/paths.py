"""Output locations checked before any long work starts, so a bad path is one clear line up front."""

from __future__ import annotations

import os
from pathlib import Path

from robusteval.errors import UserError


def output_dir(path: str | os.PathLike) -> Path:
    """Create the directory ``path`` (or accept an existing one) and check it is writable.

    Every problem — a file in the way, a part of the path that is a file, no permission — is a one-line
    :class:`UserError`.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"output directory {path} exists and is not a directory") from None
    except NotADirectoryError:
        raise UserError(f"cannot create output directory {path}: part of the path is not a directory") \
            from None
    except OSError as exc:
        raise UserError(f"cannot create output directory {path} ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to output directory {path} (permission denied)")
    return path


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write ``path`` through a temp file in the same directory, fsync, then ``os.replace``.

    A reader (or a later run) sees the old file or the new one, never half a file: what an interrupted
    or failed write (kill, full disk) leaves behind is the previous version. ``write(f)`` gets the temp
    file opened in binary mode; ``str``/``bytes`` content may be given instead of a function.
    """
    import tempfile

    path = Path(path)
    if isinstance(write, str):
        data = write.encode("utf-8")
        write = lambda f: f.write(data)
    elif isinstance(write, bytes):
        data = write
        write = lambda f: f.write(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temp file behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
