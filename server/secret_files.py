"""Files that hold secrets (the API key, the bus credentials, the bus TLS key): one rule, one message.

A secret file must be a regular file that neither its group nor other users can
read, write or execute (mode 0600 or 0400). The mode is taken from the open
file (fstat), so the file checked is the file read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["SecretFileError", "read_secret_file"]


class SecretFileError(ValueError):
    """A secret file is missing, not a regular file, or open to group or others."""


def read_secret_file(path: str | os.PathLike, what: str) -> bytes:
    """The content of the secret file ``path`` (``what`` names it in errors, e.g. "API key file")."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang the start
    except OSError as exc:
        raise SecretFileError(f"{what} {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SecretFileError(f"{what} {path} requires a regular file")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretFileError(f"{what} {path} requires mode 0600 (no access for group or others), got "
                                  f"{stat.S_IMODE(mode):04o}; run: chmod 600 {path}")
        with os.fdopen(fd, "rb", closefd=False) as file:
            return file.read()
    finally:
        os.close(fd)
