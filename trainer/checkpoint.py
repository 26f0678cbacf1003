"""Trainer checkpoints: everything a restarted trainer needs to go on exactly.

    <data_dir>/trainer/<delta_seq:020d>/
        table.snap    rows with their Adagrad accumulators (EmbeddingTable format)
        dense.bin     dense weights and Adam state (server.tensor_io format)
        joiner.bin    log read positions, the join buffer, the sampler's
                      random state (trainer.joiner)
        sketch.bin    the admission sketch (zlib-compressed uint16[depth, width])
        meta.json     {"delta_seq", "steps", "created_s", "counters",
                       "positions": the joiner's next record per log}

Written like serving snapshots (temp dir, fsync, rename), so a kill -9 at
any moment leaves the previous checkpoint whole. Every checkpoint is taken
right after a delta emission, so its delta_seq covers all the state in it.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from server.streams.snapshots import atomic_directory, complete_dirs
from server.table import EmbeddingTable, SnapshotError
from server.tensor_io import decode_tensors, encode_tensors
from trainer.joiner import Joiner
from trainer.model import TrainerModel
from server.streams import CHECKPOINTS, Streams

log = logging.getLogger(__name__)


def checkpoint_root(data_dir) -> Path:
    return Streams(data_dir).path(CHECKPOINTS)


def save_checkpoint(data_dir, model: TrainerModel, joiner: Joiner | None, delta_seq: int, keep: int = 2,
                    counters: dict | None = None) -> Path:
    """Writes a checkpoint at delta_seq (``counters``: running totals to carry
    over a restart) and keeps the newest ``keep``."""
    final = checkpoint_root(data_dir) / f"{int(delta_seq):020d}"
    tensors = {f"dense.{k}": v for k, v in model.dense_state().items()}
    for index, state in model.optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"adam.{index}.{name}"] = torch.as_tensor(value).detach().cpu().numpy()
    with atomic_directory(final) as tmp:
        model.table.save(tmp / "table.snap")
        (tmp / "dense.bin").write_bytes(encode_tensors(tensors))
        (tmp / "joiner.bin").write_bytes(joiner.state() if joiner is not None else b"")
        sketch = model.table.sketch
        (tmp / "sketch.bin").write_bytes(struct.pack("<II", *sketch.shape) + zlib.compress(sketch.tobytes(), 1))
        (tmp / "meta.json").write_text(json.dumps({"delta_seq": int(delta_seq), "steps": model.steps,
                                                   "created_s": time.time(), "counters": counters or {},
                                                   "positions": joiner.positions if joiner is not None else {}}))
    for old in list_checkpoints(data_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_sketch(path: Path) -> np.ndarray:
    data = path.read_bytes()
    depth, width = struct.unpack_from("<II", data)
    return np.frombuffer(zlib.decompress(data[8:]), dtype=np.uint16).reshape(depth, width)


def list_checkpoints(data_dir) -> list[Path]:
    return complete_dirs(checkpoint_root(data_dir))


def load_checkpoint(data_dir, model: TrainerModel, joiner: Joiner | None) -> dict | None:
    """Restores the newest readable checkpoint into model (and joiner);
    returns its meta ({"delta_seq", "steps", "counters", ...}), or None."""
    for path in reversed(list_checkpoints(data_dir)):
        try:
            meta = json.loads((path / "meta.json").read_text())
            table = EmbeddingTable.load(path / "table.snap")
            tensors = decode_tensors((path / "dense.bin").read_bytes())
            joiner_state = (path / "joiner.bin").read_bytes()
            sketch = _read_sketch(path / "sketch.bin")
        except (OSError, ValueError, KeyError, SnapshotError, zlib.error) as exc:
            log.error("trainer checkpoint %s is unreadable (%s); trying an older one", path, exc)
            continue
        if table.dim != model.table.dim:
            raise ValueError(f"checkpoint {path} has row dim {table.dim}, the model requires {model.table.dim}")
        table.restore_sketch(sketch)
        model.table = table
        model.dense.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("dense.")})
        optimizer_state = model.optimizer.state_dict()
        restored: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                restored.setdefault(int(index), {})[name] = torch.from_numpy(value)
        optimizer_state["state"] = restored
        model.optimizer.load_state_dict(optimizer_state)
        model.steps = int(meta.get("steps", 0))
        if joiner is not None and joiner_state:
            joiner.restore(joiner_state)
        return meta
    return None
