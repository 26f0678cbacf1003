"""Kernels of the collisionless embedding table: a bucketized cuckoo hash map.

Layout (B buckets, S = 8 slots per bucket, capacity C = B * S, row dim D)::

    keys     uint64[C]     bucket b owns keys[b*S : b*S+S]: one 64-byte cache line
    rows     [C, W]        rows[p] belongs to keys[p], stored in the table's row type
                           (server.table.quantize.storage_layout: float32[C, D] for fp32,
                           the fp16 bits uint16[C, D], or int8[C, D + 4] with the row's scale)
    stamps   float64[C]    last update time of keys[p] (caller's clock)
    versions uint64[V]     seqlock counters; bucket b is guarded by versions[b & (V-1)]

A key lives in one of its two buckets ``b0 = h0(key) & (B-1)`` and ``b1``
(``h1(key) & (B-1)``, or ``b0 ^ 1`` where the two coincide), so a lookup reads
at most two key lines and one row. ``EMPTY_KEY`` (2**64 - 1) marks a free
slot; FIDs use at most 63 bits, so it is never a real key. Inserting into two
full buckets walks a breadth-first cuckoo path (libcuckoo's scheme): the
shortest chain of keys that can each move to their other bucket, ending at a
free slot, moved from its far end so that every key stays findable.

Invariants (tested as properties):
    alt(alt(b, key), key) == b for either bucket b of key
    a key occurs at most once in keys[]
    count == number of slots whose key != EMPTY_KEY

Concurrency: one writer, any number of readers, no reader locks. Every
write to a bucket happens inside ``_begin_write``/``_end_write`` of that
bucket's stripe, which make its version odd and then even again. A reader
loads both stripes' versions (acquire), reads both buckets and copies the
row, then re-loads the versions after an acquire fence; if either was odd
or changed, it retries. A cuckoo move touches only the two buckets of the
moved key and holds both stripes, so a reader can never see a key in
neither bucket (no false miss), a half-written row, or another key's row.
Growth builds new arrays which the owner swaps in with one reference
assignment; readers still on the old arrays see a consistent older state,
because the writer never touches old arrays again.

A writer that dies mid-write (possible only across processes, see
server.table.shared) can leave a stripe odd forever, a row half-written in
place, or a key in two slots (killed mid-move; both copies whole, since a
move writes the row before the key). So readers give up after MAX_SPINS
re-reads and return STUCK instead of spinning forever, and the next writer
repairs: it rehashes into new arrays (``rehash_into`` keeps one copy of a
key) and re-applies the record that was in flight (absolute values).

Only a lookup reads a row as numbers (``_copy_row``, compiled once per row
type, decodes it to float32); every other kernel moves stored rows as they
are, so quantizing happens once, in numpy, before an upsert.

Kernels return status codes and never raise; ``server.table.local`` validates
shapes and dtypes before calling them and is the only place that raises.
"""

import numba
import numpy as np
from numba import types
from numba.extending import overload

from server.features import EMPTY_KEY
from server.table._atomics import (
    HOST_HAS_F16C,
    f32_from_bits,
    f32_from_f16_bits,
    fence_acquire,
    fence_release,
    load_acquire,
    load_relaxed,
    prefetch,
    prefetch_row,
    store_relaxed,
    store_release,
)

SLOTS = 8

# Status codes.
OK = 0
FULL = 1  # upsert_batch, rehash_into: no cuckoo path, or the load-factor bound is reached: grow and resume
STUCK = -1  # lookup_batch, contains_batch: a stripe stayed odd for MAX_SPINS reads (nothing written)
MAX_SPINS = 1 << 22  # ~10-20 ms of re-reads; a live writer holds a stripe for microseconds

_SLOTS_U = np.uint64(SLOTS)
_SEED0 = np.uint64(0x9E3779B97F4A7C15)
_SEED1 = np.uint64(0xC2B2AE3D27D4EB4F)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_ONE = np.uint64(1)
_INIT_SEED = np.uint64(0x165667B19E3779F9)
_MANTISSA_SHIFT = np.uint64(40)
BFS_QUEUE_LEN = 2048  # scratch nodes for one cuckoo-path search
_MAX_BFS_DEPTH = 5
_PREFETCH_AHEAD = 16
_LOOKUP_STAGE = 10
_RING = 64  # > 3 * _LOOKUP_STAGE and > 2 * _PREFETCH_AHEAD, a power of two
_RING_MASK = _RING - 1


@numba.njit(inline="always")
def mix64(x):
    """MurmurHash3's 64-bit finalizer: a bijection with full avalanche."""
    x ^= x >> _S33
    x *= _M1
    x ^= x >> _S33
    x *= _M2
    x ^= x >> _S33
    return x


@numba.njit(cache=True, nogil=True)
def mix64_batch(keys, salt, out):
    """out[i] = mix64(keys[i] ^ salt): the table's hash, for callers that hash FIDs themselves."""
    for i in range(keys.shape[0]):
        out[i] = mix64(keys[i] ^ salt)


@numba.njit(inline="always")
def _buckets(key, mask):
    b0 = mix64(key ^ _SEED0) & mask
    b1 = mix64(key ^ _SEED1) & mask
    if b1 == b0:
        b1 = b0 ^ _ONE
    return np.int64(b0), np.int64(b1)


@numba.njit(inline="always")
def _alt_bucket(key, bucket, mask):
    b0, b1 = _buckets(key, mask)
    return b1 if bucket == b0 else b0


@numba.njit(inline="always")
def _find_in_bucket(keys, bucket, key):
    # No early exit: LLVM turns the 8 compares into one SIMD compare.
    base = bucket * SLOTS
    pos = -1
    for s in range(SLOTS):
        if keys[base + s] == key:
            pos = base + s
    return pos


@numba.njit(inline="always")
def _find(keys, b0, b1, key):
    pos = _find_in_bucket(keys, b0, key)
    if pos < 0:
        pos = _find_in_bucket(keys, b1, key)
    return pos


@numba.njit(inline="always")
def _begin_write(versions, bucket):
    stripe = bucket & (versions.shape[0] - 1)
    store_relaxed(versions, stripe, load_relaxed(versions, stripe) + _ONE)
    fence_release()


@numba.njit(inline="always")
def _end_write(versions, bucket):
    stripe = bucket & (versions.shape[0] - 1)
    store_release(versions, stripe, load_relaxed(versions, stripe) + _ONE)


@numba.njit(inline="always")
def _begin_write2(versions, bucket_a, bucket_b):
    stripe_a = bucket_a & (versions.shape[0] - 1)
    stripe_b = bucket_b & (versions.shape[0] - 1)
    store_relaxed(versions, stripe_a, load_relaxed(versions, stripe_a) + _ONE)
    if stripe_b != stripe_a:
        store_relaxed(versions, stripe_b, load_relaxed(versions, stripe_b) + _ONE)
    fence_release()


@numba.njit(inline="always")
def _end_write2(versions, bucket_a, bucket_b):
    stripe_a = bucket_a & (versions.shape[0] - 1)
    stripe_b = bucket_b & (versions.shape[0] - 1)
    if stripe_b != stripe_a:
        store_release(versions, stripe_b, load_relaxed(versions, stripe_b) + _ONE)
    store_release(versions, stripe_a, load_relaxed(versions, stripe_a) + _ONE)


@numba.njit(inline="always")
def _init_row(key, out, i, scale):
    """out[i] = deterministic pseudo-random row in [-scale, scale) from the key alone."""
    for j in range(out.shape[1]):
        h = mix64(key ^ (_INIT_SEED * np.uint64(j + 1)))
        unit = np.float64(h >> _MANTISSA_SHIFT) / np.float64(1 << 24)
        out[i, j] = np.float32((2.0 * unit - 1.0) * scale)


_FP16_TO_FP32 = np.float32(2.0 ** 112)  # fp16 and fp32 exponent biases differ by 112


@numba.njit(inline="always")
def half_bits_to_f32(h):
    """The float32 value of the fp16 whose bits are ``h``, for CPUs without F16C: the half's sign,
    exponent and mantissa moved into a float32's fields, times 2**112. Exact for every finite half,
    subnormals included (a table never stores inf or NaN)."""
    h = np.uint32(h)
    return f32_from_bits(((h & np.uint32(0x8000)) << np.uint32(16))
                         | ((h & np.uint32(0x7FFF)) << np.uint32(13))) * _FP16_TO_FP32


def _copy_row(rows, pos, out, i):
    """out[i] = the float32 values of stored row rows[pos] (numba only; see the overload below)."""
    raise NotImplementedError("_copy_row runs inside numba kernels only")


@overload(_copy_row, inline="always")
def _copy_row_of(rows, pos, out, i):
    """One implementation per storage dtype (server.table.quantize): each reads exactly the
    values ``decode_rows`` gives, so serving's rows and the byte-exact checks agree."""
    if rows.dtype == types.float32:
        def copy_fp32(rows, pos, out, i):
            for j in range(out.shape[1]):
                out[i, j] = rows[pos, j]
        return copy_fp32
    if rows.dtype == types.uint16:
        # F16C's conversion measured 1.02 to 1.05x fp32's lookup rate, the bit moves 0.91x (4M keys, one thread)
        decode = f32_from_f16_bits if HOST_HAS_F16C else half_bits_to_f32

        def copy_fp16(rows, pos, out, i):
            for j in range(out.shape[1]):
                out[i, j] = decode(rows[pos, j])
        return copy_fp16
    if rows.dtype == types.int8:
        def copy_int8(rows, pos, out, i):
            dim = out.shape[1]
            bits = np.uint32(0)
            for k in range(4):
                bits |= np.uint32(np.uint8(rows[pos, dim + k])) << np.uint32(8 * k)
            scale = f32_from_bits(bits)
            for j in range(dim):
                out[i, j] = np.float32(rows[pos, j]) * scale
        return copy_int8
    return None


@numba.njit(inline="always")
def _read_row(keys, rows, versions, key, b0, b1, hint, stripe_mask, out, i):
    """Seqlock read of key's row into out[i]: 1 found, 0 missing, STUCK after
    MAX_SPINS attempts (a writer died holding the stripe, see the module doc).
    hint is where key probably is (checked first), or -1."""
    s0 = b0 & stripe_mask
    s1 = b1 & stripe_mask
    for _ in range(MAX_SPINS):
        v0 = load_acquire(versions, s0)
        v1 = load_acquire(versions, s1)
        if (v0 | v1) & _ONE:
            continue
        if hint >= 0 and keys[hint] == key:
            pos = hint
        else:
            pos = _find(keys, b0, b1, key)
        if pos >= 0:
            _copy_row(rows, pos, out, i)
        fence_acquire()
        if load_relaxed(versions, s0) == v0 and load_relaxed(versions, s1) == v1:
            return 1 if pos >= 0 else 0
    return STUCK


@numba.njit(inline="always")
def _prefetch_buckets(keys, key, mask):
    b0, b1 = _buckets(key, mask)
    prefetch(keys, b0 * SLOTS)
    prefetch(keys, b1 * SLOTS)


@numba.njit(inline="always")
def _likely_pos(keys, key, mask):
    """Where key is, or would be inserted: a hint for prefetching, read
    without the seqlock (always in bounds, possibly stale), or -1."""
    b0, b1 = _buckets(key, mask)
    pos = _find(keys, b0, b1, key)
    if pos < 0:
        pos = _free_slot(keys, b0)
    if pos < 0:
        pos = _free_slot(keys, b1)
    return pos


@numba.njit(cache=True, nogil=True)
def lookup_batch(keys, rows, versions, fids, out, found, init_scale):
    """out[i] = row of fids[i]; a missing FID gives zeros, or a deterministic
    init row when init_scale > 0. found[i] says which were present.
    Safe against one concurrent writer. Returns the number found, or STUCK
    (out and found then undefined: refresh the arrays and call again).

    Software-pipelined, since the loads are random and independent, so that
    many cache misses are in flight at once. With P = _LOOKUP_STAGE, FID i
    passes through (hints are unsynchronised reads, checked again at the end):
        step i      hash; prefetch bucket b0
        step i+P    probe b0; if found prefetch the row, else prefetch b1
        step i+2P   if not in b0, probe b1; if found prefetch the row
        step i+3P   seqlock read of the row (every line already in cache)
    Most keys sit in b0 (83% at load 0.95), so b1 is fetched only for the rest.
    EMPTY_KEY, never stored, is not probed at all (found False, a missing row),
    so a caller can blank out entries it does not need, such as padding."""
    mask = np.uint64(keys.shape[0] // SLOTS - 1)
    stripe_mask = np.int64(versions.shape[0] - 1)
    n = fids.shape[0]
    dim = out.shape[1]
    ring0 = np.empty(_RING, dtype=np.int64)
    ring1 = np.empty(_RING, dtype=np.int64)
    ring_hint = np.empty(_RING, dtype=np.int64)
    hits = 0
    for step in range(n + 3 * _LOOKUP_STAGE):
        if step < n and fids[step] != EMPTY_KEY:
            b0, b1 = _buckets(fids[step], mask)
            ring0[step & _RING_MASK] = b0
            ring1[step & _RING_MASK] = b1
            prefetch(keys, b0 * SLOTS)
        k = step - _LOOKUP_STAGE
        if 0 <= k < n and fids[k] != EMPTY_KEY:
            slot = k & _RING_MASK
            hint = _find_in_bucket(keys, ring0[slot], fids[k])
            ring_hint[slot] = hint
            if hint >= 0:
                prefetch_row(rows, hint)
            else:
                prefetch(keys, ring1[slot] * SLOTS)
        k = step - 2 * _LOOKUP_STAGE
        if 0 <= k < n and fids[k] != EMPTY_KEY and ring_hint[k & _RING_MASK] < 0:
            slot = k & _RING_MASK
            hint = _find_in_bucket(keys, ring1[slot], fids[k])
            ring_hint[slot] = hint
            if hint >= 0:
                prefetch_row(rows, hint)
        i = step - 3 * _LOOKUP_STAGE
        if i < 0:
            continue
        key = fids[i]
        hit = False
        if key != EMPTY_KEY:
            slot = i & _RING_MASK
            status = _read_row(keys, rows, versions, key, ring0[slot], ring1[slot], ring_hint[slot],
                               stripe_mask, out, i)
            if status == STUCK:
                return STUCK
            hit = status == 1
        found[i] = hit
        if hit:
            hits += 1
        elif init_scale > 0.0:
            _init_row(key, out, i, init_scale)
        else:
            for j in range(dim):
                out[i, j] = 0.0
    return hits


@numba.njit(cache=True, nogil=True)
def contains_batch(keys, versions, fids, found):
    """found[i] = fids[i] is present. Safe against one concurrent writer.
    Returns OK, or STUCK as lookup_batch does."""
    mask = np.uint64(keys.shape[0] // SLOTS - 1)
    stripe_mask = np.int64(versions.shape[0] - 1)
    no_row = np.empty((1, 0), dtype=np.float32)  # _read_row with rows of width 0: a probe, nothing copied
    for i in range(fids.shape[0]):
        key = fids[i]
        if key == EMPTY_KEY:
            found[i] = False
            continue
        b0, b1 = _buckets(key, mask)
        status = _read_row(keys, no_row, versions, key, b0, b1, -1, stripe_mask, no_row, 0)
        if status == STUCK:
            return STUCK
        found[i] = status == 1
    return OK


@numba.njit(inline="always")
def _free_slot(keys, bucket):
    base = bucket * SLOTS
    for s in range(SLOTS):
        if keys[base + s] == EMPTY_KEY:
            return base + s
    return -1


@numba.njit(cache=True, nogil=True)
def _cuckoo_path(keys, b0, b1, mask, q_bucket, q_parent, q_slot, q_depth):
    """Breadth-first search from b0 and b1 for a free slot reachable by moving
    keys to their other bucket. Fills the queue arrays; returns the queue index
    of the node whose bucket has a free slot, or -1. Node k was reached from
    node q_parent[k] by moving the key in slot q_slot[k] of the parent's bucket."""
    q_bucket[0] = b0
    q_parent[0] = -1
    q_slot[0] = -1
    q_depth[0] = 0
    q_bucket[1] = b1
    q_parent[1] = -1
    q_slot[1] = -1
    q_depth[1] = 0
    head = 0
    tail = 2
    capacity = q_bucket.shape[0]
    alts = np.empty(SLOTS, dtype=np.int64)
    while head < tail:
        bucket = q_bucket[head]
        depth = q_depth[head]
        base = bucket * SLOTS
        for s in range(SLOTS):  # issue all 8 misses before waiting on any
            alts[s] = _alt_bucket(keys[base + s], bucket, mask)
            prefetch(keys, alts[s] * SLOTS)
        for s in range(SLOTS):
            if tail >= capacity:
                return -1
            alt = alts[s]
            q_bucket[tail] = alt
            q_parent[tail] = head
            q_slot[tail] = s
            q_depth[tail] = depth + 1
            if _free_slot(keys, alt) >= 0:
                return tail
            if depth + 1 < _MAX_BFS_DEPTH:
                tail += 1
        head += 1
    return -1


@numba.njit(inline="always")
def _move(keys, rows, stamps, versions, src, src_bucket, dst, dst_bucket):
    # Row, then key, then clear the source: a writer killed at any point
    # leaves every key with a whole row (at worst twice; see rehash_into).
    _begin_write2(versions, src_bucket, dst_bucket)
    for j in range(rows.shape[1]):
        rows[dst, j] = rows[src, j]
    stamps[dst] = stamps[src]
    keys[dst] = keys[src]
    keys[src] = EMPTY_KEY
    _end_write2(versions, src_bucket, dst_bucket)


@numba.njit(cache=True, nogil=True)
def _place(keys, rows, stamps, versions, key, mask, q_bucket, q_parent, q_slot, q_depth):
    """Frees a slot in one of key's buckets (moving others along a cuckoo path)
    and returns it, or -1 if no path exists (the table must grow)."""
    b0, b1 = _buckets(key, mask)
    pos = _free_slot(keys, b0)
    if pos >= 0:
        return pos
    pos = _free_slot(keys, b1)
    if pos >= 0:
        return pos
    node = _cuckoo_path(keys, b0, b1, mask, q_bucket, q_parent, q_slot, q_depth)
    if node < 0:
        return -1
    hole = _free_slot(keys, q_bucket[node])
    hole_bucket = q_bucket[node]
    while q_parent[node] >= 0:
        parent = q_parent[node]
        src_bucket = q_bucket[parent]
        src = src_bucket * SLOTS + q_slot[node]
        _move(keys, rows, stamps, versions, src, src_bucket, hole, hole_bucket)
        hole = src
        hole_bucket = src_bucket
        node = parent
    return hole


@numba.njit(cache=True, nogil=True)
def upsert_batch(keys, rows, stamps, versions, fids, values, row_stamps, admit, start, max_count, count,
                 q_bucket, q_parent, q_slot, q_depth):
    """Writes values[i] as the row of fids[i], stamped row_stamps[i], for i in [start, n).

    Writer only. Stops early, returning (FULL, i, count) with fids[:i] written,
    when fids[i] is new and either the table holds max_count keys or no cuckoo
    path frees a slot: the owner grows the table and calls again from i.
    Returns (OK, n, count) otherwise. Only fids with admit[i] set are
    written. Keys equal to EMPTY_KEY must have been rejected by the caller."""
    mask = np.uint64(keys.shape[0] // SLOTS - 1)
    n = fids.shape[0]
    for i in range(start, n):
        if i + 2 * _PREFETCH_AHEAD < n:
            _prefetch_buckets(keys, fids[i + 2 * _PREFETCH_AHEAD], mask)
        if i + _PREFETCH_AHEAD < n:
            hint = _likely_pos(keys, fids[i + _PREFETCH_AHEAD], mask)
            if hint >= 0:
                prefetch_row(rows, hint)
                prefetch(stamps, hint)
        key = fids[i]
        if not admit[i]:
            continue
        b0, b1 = _buckets(key, mask)
        pos = _find(keys, b0, b1, key)
        if pos < 0:
            if count >= max_count:
                return FULL, i, count
            # The two free-slot probes are inlined here (as in _place) for speed: calling
            # _place for every new key measured 5.5 vs 8.0-9.4 M inserts/s (bench table, 2M keys).
            pos = _free_slot(keys, b0)
            if pos < 0:
                pos = _free_slot(keys, b1)
            if pos < 0:
                pos = _place(keys, rows, stamps, versions, key, mask, q_bucket, q_parent, q_slot, q_depth)
            if pos < 0:
                return FULL, i, count
            count += 1
        bucket = pos // SLOTS
        _begin_write(versions, bucket)
        for j in range(rows.shape[1]):
            rows[pos, j] = values[i, j]
        stamps[pos] = row_stamps[i]
        keys[pos] = key
        _end_write(versions, bucket)
    return OK, n, count


@numba.njit(inline="always")
def _clear(keys, versions, pos):
    bucket = pos // SLOTS
    _begin_write(versions, bucket)
    keys[pos] = EMPTY_KEY
    _end_write(versions, bucket)


@numba.njit(cache=True, nogil=True)
def delete_batch(keys, versions, fids, deleted):
    """Removes each of fids; deleted[i] says whether fids[i] was present.
    Writer only. Returns the number removed."""
    mask = np.uint64(keys.shape[0] // SLOTS - 1)
    removed = 0
    for i in range(fids.shape[0]):
        key = fids[i]
        deleted[i] = False
        if key == EMPTY_KEY:
            continue
        b0, b1 = _buckets(key, mask)
        pos = _find(keys, b0, b1, key)
        if pos >= 0:
            _clear(keys, versions, pos)
            deleted[i] = True
            removed += 1
    return removed


@numba.njit(cache=True, nogil=True)
def evict_by_slot(keys, stamps, versions, cutoffs, shift, out_fids):
    """Removes every key whose stamp < cutoffs[key >> shift] and writes it to
    out_fids. Writer only. Returns the number evicted."""
    n = 0
    for pos in range(keys.shape[0]):
        key = keys[pos]
        if key != EMPTY_KEY and stamps[pos] < cutoffs[np.int64(key >> shift)]:
            _clear(keys, versions, pos)
            out_fids[n] = key
            n += 1
    return n


@numba.njit(cache=True, nogil=True)
def count_expired_by_slot(keys, stamps, cutoffs, shift):
    """The number of keys ``evict_by_slot`` would remove with the same cutoffs; changes nothing.
    Writer only (a concurrent writer could change the answer)."""
    n = 0
    for pos in range(keys.shape[0]):
        key = keys[pos]
        if key != EMPTY_KEY and stamps[pos] < cutoffs[np.int64(key >> shift)]:
            n += 1
    return n


@numba.njit(cache=True, nogil=True)
def export_chunk(keys, rows, stamps, start, out_fids, out_rows, out_stamps):
    """Copies up to len(out_fids) live entries from slot start onwards.
    Returns (next_start, n); next_start == capacity when done. Writer only
    (or with no concurrent writer): it reads without the seqlock."""
    n = 0
    pos = start
    cap = keys.shape[0]
    limit = out_fids.shape[0]
    while pos < cap and n < limit:
        key = keys[pos]
        if key != EMPTY_KEY:
            out_fids[n] = key
            for j in range(rows.shape[1]):
                out_rows[n, j] = rows[pos, j]
            out_stamps[n] = stamps[pos]
            n += 1
        pos += 1
    return pos, n


@numba.njit(cache=True, nogil=True)
def sketch_count(sketch, fids, counts):
    """Count-min sketch with conservative update: adds one sighting of each
    fid (saturating at the counter's max) and writes its estimated count,
    which never under-counts. sketch is uint16[depth, width], width a power of 2."""
    depth = sketch.shape[0]
    mask = np.uint64(sketch.shape[1] - 1)
    cap = np.uint16(0xFFFF)
    for i in range(fids.shape[0]):
        key = fids[i]
        low = cap
        for r in range(depth):
            c = sketch[r, np.int64(mix64(key ^ (_SEED1 * np.uint64(r + 1))) & mask)]
            if c < low:
                low = c
        if low < cap:
            low += np.uint16(1)
            for r in range(depth):
                col = np.int64(mix64(key ^ (_SEED1 * np.uint64(r + 1))) & mask)
                if sketch[r, col] < low:
                    sketch[r, col] = low
        counts[i] = low


@numba.njit(cache=True, nogil=True)
def sketch_estimate(sketch, fids, counts):
    """Estimated sightings of each fid, without counting a new one."""
    depth = sketch.shape[0]
    mask = np.uint64(sketch.shape[1] - 1)
    for i in range(fids.shape[0]):
        key = fids[i]
        low = np.uint16(0xFFFF)
        for r in range(depth):
            c = sketch[r, np.int64(mix64(key ^ (_SEED1 * np.uint64(r + 1))) & mask)]
            if c < low:
                low = c
        counts[i] = low


@numba.njit(cache=True, nogil=True)
def rehash_into(keys, rows, stamps, new_keys, new_rows, new_stamps, new_versions,
                q_bucket, q_parent, q_slot, q_depth, dedupe):
    """Inserts every live entry of the old arrays into empty new ones (not yet
    visible to readers); with ``dedupe``, a key found twice is inserted once
    (repair after a dead writer; it costs a probe per key, so growth skips
    it). Returns OK, or FULL if the new arrays are too small."""
    mask = np.uint64(new_keys.shape[0] // SLOTS - 1)
    for src in range(keys.shape[0]):
        ahead = src + 2 * _PREFETCH_AHEAD
        if ahead < keys.shape[0] and keys[ahead] != EMPTY_KEY:
            _prefetch_buckets(new_keys, keys[ahead], mask)
        ahead = src + _PREFETCH_AHEAD
        if ahead < keys.shape[0] and keys[ahead] != EMPTY_KEY:
            hint = _likely_pos(new_keys, keys[ahead], mask)
            if hint >= 0:
                prefetch_row(new_rows, hint)
                prefetch(new_stamps, hint)
        key = keys[src]
        if key == EMPTY_KEY:
            continue
        b0, b1 = _buckets(key, mask)
        if dedupe and _find(new_keys, b0, b1, key) >= 0:
            continue  # a second copy, left by a writer killed mid-move: both are whole
        pos = _free_slot(new_keys, b0)  # inlined for speed, as in upsert_batch
        if pos < 0:
            pos = _free_slot(new_keys, b1)
        if pos < 0:
            pos = _place(new_keys, new_rows, new_stamps, new_versions, key, mask, q_bucket, q_parent, q_slot, q_depth)
        if pos < 0:
            return FULL
        new_keys[pos] = key
        for j in range(rows.shape[1]):
            new_rows[pos, j] = rows[src, j]
        new_stamps[pos] = stamps[src]
    return OK
