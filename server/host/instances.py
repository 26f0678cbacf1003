"""Ranker instance count: a copy of a model repository with another ``instance_group.count``.

The shipped ``model_repository/ranker/config.pbtxt`` sets the count; to run
N instances, edit ``count`` there (the official-container path) or let
``repository_with_instances`` write a copy (tests, ``bench instances``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from server.host.launcher import DEFAULT_MODEL_REPOSITORY

_COUNT = re.compile(r"(instance_group\s*\[\s*\{[^}]*?count:\s*)(\d+)")
_SHARED = re.compile(r'(key: "shared_table"\s*value: \{ string_value: ")(\w+)(")')


def repository_with_instances(target: str | Path, count: int, shared_table: bool = True,
                              source: str | Path = DEFAULT_MODEL_REPOSITORY) -> Path:
    """Copies ``source`` to ``target`` with the ranker's instance count and shared_table parameter set."""
    if count < 1:
        raise ValueError(f"instance count requires >= 1, got {count}")
    target = Path(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    config = target / "ranker" / "config.pbtxt"
    text = config.read_text()
    text, n = _COUNT.subn(lambda m: f"{m.group(1)}{count}", text)
    if n != 1:
        raise ValueError(f"{config} requires one instance_group count, found {n}")
    text, n = _SHARED.subn(lambda m: f"{m.group(1)}{'true' if shared_table else 'false'}{m.group(3)}", text)
    if n != 1:
        raise ValueError(f"{config} requires one shared_table parameter, found {n}")
    config.write_text(text)
    return target
