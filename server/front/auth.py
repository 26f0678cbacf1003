"""API keys: loaded once from a file that only its owner can read, never from argv.

``monolith-rt serve --api-key-file PATH`` (or ``MONOLITH_API_KEY_FILE`` in
the environment, for containers that mount secrets as files). Callers send
``Authorization: Bearer <key>`` (HTTP header or gRPC metadata). The key is
never logged, printed or put on a command line; errors name the file, not
its content.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

ENV_API_KEY_FILE = "MONOLITH_API_KEY_FILE"
MIN_KEY_CHARS = 16


class ApiKeyError(ValueError):
    """The key file is unusable; the message says why and how to fix it."""


def api_key_file_from(flag: str | os.PathLike | None) -> Path | None:
    """The flag's path, else $MONOLITH_API_KEY_FILE, else None (keys off)."""
    value = flag or os.environ.get(ENV_API_KEY_FILE)
    return Path(value) if value else None


def load_api_key(path: str | os.PathLike | None) -> bytes | None:
    if path is None:
        return None
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise ApiKeyError(f"API key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ApiKeyError(f"API key file {path} requires a regular file")
    if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ApiKeyError(f"API key file {path} is readable or writable by every user (mode "
                          f"{stat.S_IMODE(info.st_mode):o}); run: chmod 600 {path}")
    key = path.read_bytes().strip()
    if len(key) < MIN_KEY_CHARS or not all(0x21 <= b <= 0x7E for b in key):
        raise ApiKeyError(f"API key file {path} requires one key of at least {MIN_KEY_CHARS} printable ASCII "
                          "characters without spaces (e.g. from: openssl rand -hex 32)")
    return key
