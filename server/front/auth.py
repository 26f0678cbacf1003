"""API keys: loaded once from a file that only its owner can read (server.secret_files), never from argv.

``monolith-rt serve --api-key-file PATH`` (or ``MONOLITH_API_KEY_FILE`` in
the environment, for containers that mount secrets as files). Callers send
``Authorization: Bearer <key>`` (HTTP header or gRPC metadata). The key is
never logged, printed or put on a command line; errors name the file, not
its content.
"""

from __future__ import annotations

import os
from pathlib import Path

from server.secret_files import SecretFileError, read_secret_file

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
        key = read_secret_file(path, "API key file").strip()
    except SecretFileError as exc:
        raise ApiKeyError(str(exc)) from None
    if len(key) < MIN_KEY_CHARS or not all(0x21 <= b <= 0x7E for b in key):
        raise ApiKeyError(f"API key file {path} requires one key of at least {MIN_KEY_CHARS} printable ASCII "
                          "characters without spaces (e.g. from: openssl rand -hex 32)")
    return key
