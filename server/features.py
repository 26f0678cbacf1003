"""Feature schema and feature IDs (FIDs): the one source of truth for ranker and trainer.

FID rule (reproducible in any language)::

    bit   63      62 ........ 48   47 ................................ 0
          0       slot id (15 bits) low 48 bits of H(value)

    H(value) = BLAKE2b with an 8-byte digest of the UTF-8 bytes of the value
               as text (integers in decimal, no sign for >= 0), read as a
               little-endian unsigned 64-bit integer.

So ``fid(slot, value) = (slot << 48) | (H(value) & (2**48 - 1))``. Bit 63 is
always 0, so a FID can never equal the table's reserved empty key (``EMPTY_KEY``,
2**64 - 1, which marks free slots in server.table).
Slot 0 is reserved: ``PAD_FID = 0`` pads multi-valued slots and is never a
real feature (lookups skip it).

Request layout: each side's slots are laid out in schema order, each taking
``max_values`` columns (padded with PAD_FID), so a request is

    user_fids  uint64[Wu]       Wu = sum of max_values over user and context slots
    item_fids  uint64[N, Wi]    Wi = sum of max_values over item slots

(on the wire the ranker, which batches dynamically, takes each with a
leading batch dimension of 1: [1, Wu] and [1, N, Wi]).

The schema file (JSON) lives beside the ranker model in the model repository;
``load_schema`` validates it once.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["PAD_FID", "SIGNATURE_BITS", "SLOT_BITS", "SLOT_IDS", "FeatureSchema", "Slot", "fid", "fids", "load_schema",
           "random_fids", "shipped_schema", "slot_of"]

SLOT_BITS = 15
SIGNATURE_BITS = 48
MAX_SLOT = (1 << SLOT_BITS) - 1
SLOT_IDS = 1 << (64 - SIGNATURE_BITS)  # values of fid >> SIGNATURE_BITS over every 64-bit key (bit 63 included)
PAD_FID = 0
EMPTY_KEY = np.uint64(0xFFFFFFFFFFFFFFFF)  # never a FID (bit 63): free table slots, refused in requests
_SIGNATURE_MASK = (1 << SIGNATURE_BITS) - 1
_SIDES = ("user", "context", "item")
_POOLINGS = ("sum", "mean")


def _signature(value) -> int:
    if isinstance(value, bytes):
        data = value
    else:
        data = str(value).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _SIGNATURE_MASK


def fid(slot: int, value) -> int:
    """The FID of ``value`` (str, int or bytes) in slot ``slot`` (1..32767)."""
    if not 1 <= slot <= MAX_SLOT:
        raise ValueError(f"slot requires 1 <= slot <= {MAX_SLOT}, got {slot}")
    return (slot << SIGNATURE_BITS) | _signature(value)


def fids(slot: int, values: Iterable) -> np.ndarray:
    """FIDs of many values of one slot, uint64."""
    return np.fromiter((fid(slot, v) for v in values), dtype=np.uint64)


def random_fids(slot: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """n FIDs of slot ``slot`` with random signatures (load tests, benchmarks), uint64."""
    if not 1 <= slot <= MAX_SLOT:
        raise ValueError(f"slot requires 1 <= slot <= {MAX_SLOT}, got {slot}")
    return np.uint64(slot << SIGNATURE_BITS) | rng.integers(0, 1 << SIGNATURE_BITS, n, dtype=np.uint64)


def slot_of(fids_: np.ndarray) -> np.ndarray:
    """Slot ids of FIDs (vectorized), int64."""
    return (np.asarray(fids_, dtype=np.uint64) >> np.uint64(SIGNATURE_BITS)).astype(np.int64)


@dataclass(frozen=True)
class Slot:
    """One feature group. ttl_s: rows not updated for this long are evicted;
    min_count: sightings before a FID is admitted to the table."""

    name: str
    slot: int
    side: str
    dim: int
    max_values: int = 1
    pooling: str = "sum"
    ttl_s: float = 30 * 86400.0
    min_count: int = 1

    def __post_init__(self):
        if not 1 <= self.slot <= MAX_SLOT:
            raise ValueError(f"slot {self.name!r}: slot id requires 1..{MAX_SLOT}, got {self.slot}")
        if self.side not in _SIDES:
            raise ValueError(f"slot {self.name!r}: side requires one of {_SIDES}, got {self.side!r}")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"slot {self.name!r}: pooling requires one of {_POOLINGS}, got {self.pooling!r}")
        if self.dim < 1 or self.max_values < 1 or self.min_count < 1 or not self.ttl_s > 0:
            raise ValueError(f"slot {self.name!r}: dim, max_values, min_count require >= 1 and ttl_s > 0")


def _column_slots(slots: Sequence[Slot]) -> np.ndarray:
    columns = np.concatenate([np.full(s.max_values, s.slot, dtype=np.int64) for s in slots])
    columns.flags.writeable = False
    return columns


@dataclass(frozen=True)
class FeatureSchema:
    """The slots, in request-layout order per side, and the dense network config."""

    slots: tuple[Slot, ...]
    dense: Mapping = field(default_factory=dict)
    # The labels feedback may carry, inclusive ("labels": {"min": .., "max": ..} in the file).
    # Within [0, 1]: the trainer's loss is binary cross-entropy.
    label_min: float = 0.0
    label_max: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.label_min <= self.label_max <= 1.0:
            raise ValueError(f"labels requires 0 <= min <= max <= 1 (the trainer's loss is binary cross-entropy), "
                             f"got min {self.label_min}, max {self.label_max}")
        names = [s.name for s in self.slots]
        ids = [s.slot for s in self.slots]
        if len(set(names)) != len(names) or len(set(ids)) != len(ids):
            raise ValueError(f"slot names and ids must be unique, got names {names} ids {ids}")
        if not any(s.side == "item" for s in self.slots):
            raise ValueError("schema requires at least one item slot")
        dims = {s.dim for s in self.slots}
        if len(dims) != 1:
            raise ValueError(f"all slots require one embedding dim (FM interactions), got {sorted(dims)}")

    @property
    def dim(self) -> int:
        return self.slots[0].dim

    @functools.cached_property
    def user_slots(self) -> tuple[Slot, ...]:
        return tuple(s for s in self.slots if s.side != "item")

    @functools.cached_property
    def item_slots(self) -> tuple[Slot, ...]:
        return tuple(s for s in self.slots if s.side == "item")

    @functools.cached_property
    def user_width(self) -> int:
        return sum(s.max_values for s in self.user_slots)

    @functools.cached_property
    def item_width(self) -> int:
        return sum(s.max_values for s in self.item_slots)

    @functools.cached_property
    def user_column_slots(self) -> np.ndarray:
        """Slot id of each column of the user side's request layout, int64 [Wu] (read-only)."""
        return _column_slots(self.user_slots)

    @functools.cached_property
    def item_column_slots(self) -> np.ndarray:
        """Slot id of each column of the item side's request layout, int64 [Wi] (read-only)."""
        return _column_slots(self.item_slots)

    @property
    def num_fields(self) -> int:
        return len(self.slots)

    def slot_named(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(f"no slot named {name!r}; slots are {[s.name for s in self.slots]}")

    def encode(self, values: Mapping[str, object | Sequence], slots: Sequence[Slot]) -> np.ndarray:
        """FIDs for one side: values maps slot name -> a value or a list of values
        (missing slot = all padding; more than max_values is an error)."""
        out = np.full(sum(s.max_values for s in slots), PAD_FID, dtype=np.uint64)
        col = 0
        for s in slots:
            raw = values.get(s.name)
            if raw is not None:
                items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
                if len(items) > s.max_values:
                    raise ValueError(f"slot {s.name!r} takes at most {s.max_values} values, got {len(items)}")
                out[col : col + len(items)] = [fid(s.slot, v) for v in items]
            col += s.max_values
        return out

    def encode_request(self, user: Mapping, items: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
        """(user_fids uint64[Wu], item_fids uint64[N, Wi]) for a ranking request."""
        user_fids = self.encode(user, self.user_slots)
        item_fids = np.stack([self.encode(item, self.item_slots) for item in items]) if items else (
            np.empty((0, self.item_width), dtype=np.uint64))
        return user_fids, item_fids


def load_schema(path: str | Path) -> FeatureSchema:
    """Reads and validates a schema JSON file: {"slots": [...], "dense": {...}, "labels": {"min", "max"}}
    (labels default to [0, 1])."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        slots = tuple(Slot(**s) for s in raw["slots"])
        labels = raw.get("labels", {})
        unknown = set(labels) - {"min", "max"}
        if unknown:
            raise ValueError(f"labels takes 'min' and 'max', got {sorted(unknown)}")
        return FeatureSchema(slots=slots, dense=raw.get("dense", {}), label_min=float(labels.get("min", 0.0)),
                             label_max=float(labels.get("max", 1.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"feature schema {path}: {exc}") from exc


SHIPPED_SCHEMA = Path(__file__).resolve().parent.parent / "model_repository" / "ranker" / "feature_schema.json"


@functools.lru_cache(maxsize=1)
def shipped_schema() -> FeatureSchema:
    """The schema this package ships with its model repository (ranker and trainer both read it)."""
    return load_schema(SHIPPED_SCHEMA)
