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
