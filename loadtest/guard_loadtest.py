"""``monolith-rt loadtest guard --bus nats``: the quality guard end to end on the JetStream bus.

1. a 3-node NATS JetStream cluster on loopback, the streams created
2. batch training on MovieLens-100K without its last ``tail`` ratings (their
   times moved into the last hour, so nothing is past a TTL); the snapshot is
   published to the bus's object store
3. ``replicas`` ``monolith-rt serve`` replicas and ``monolith-rt train online``
   (quality guard on, dense records every ``dense_interval_s``, negatives at 0.1)
4. the tail replayed live, each rating one ranking request (its movie as the
   candidate) to the replicas in turn: a rating >= 4 is a click (feedback 1),
   the rest impressions without an action (sampled negatives). In the middle
   third a poisoning client joins (trainer.guard_experiment.poison_scenario):
   5 sources that replay real impressions of the period's 30 most rated
   movies with the label inverted (30% of the real volume) and a click bot
   of 3 sources (10%), all sent as explicit feedback
5. a watcher polls the trainer's ``guard/state.json``: while the guard holds
   (before its rollback) the trainer is killed with SIGKILL and restarted
   at once (``kill_during_hold``); with ``kill_during_rollback`` a second
   SIGKILL lands when a rollback is appended but no checkpoint covers it yet
   (``unconfirmed_rollback``), when the poll sees that window
6. settling: the tail's last 3,000 real ratings again, until the guard has
   been open for 10 s (at most ``settle_s``): a hold still open at the end
   would keep the trainer's newest snapshot behind what the replicas serve
7. the trainer stops (its last records and a snapshot), every replica
   catches up and stops, and each replica's rows and dense weights are
   compared with the trainer's snapshot byte for byte

Reported: ``rollbacks`` (the guard's count, kept across restarts),
``held_s`` (from the first hold seen to the rollback appended),
``poison_rows_served_after_rollback`` (rows of FIDs that only the poisoning
sources ever sent, i.e. trained only on the poison, in the stream's state
at the rollback's last record: what every replica serves once it applied
the rollback, which each is checked to have done; must be 0),
``poison_rows_served_at_end`` (the same FIDs in the replicas' final
tables, summed: a poisoning source the guard did not judge poison, or
whose quarantine ended, is trained on again after the rollback), beside
``poison_rows_emitted_before_hold`` (those of the FIDs that the records
before the rollback wrote: what it had to undo);
``dense_restored`` (the rollback's dense record equals, byte for byte, the
newest dense record at or before its target seq, as a follower of the
stream read them from the start while they were retained; and every
replica served at or past the rollback within ``timeout_s``);
``replicas_identical``; ``trainer_restarts``; ``failed_requests``
(ranking and feedback calls that failed).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtest.bus_stack import BusStack, quiesce_and_compare, served_seq, spawn_bus_stack
from server.client import RankerClient
from server.features import FeatureSchema
from server.streams.deltas import DENSE
from trainer.data import Examples, load_dataset
from trainer.guard_experiment import poison_scenario
from updater.rollback import read_state

_ROLLBACK_LINE = re.compile(r"rollback to seq (\d+) \(stream at (\d+)\).*appended up to seq (\d+)")
_POLL_S = 0.05
_SETTLED_S = 10.0
_SETTLE_RATINGS = 3000


@dataclass
class _Watch:
    """What the watcher saw of the guard, and the kills it made."""

    held_at: float | None = None
    rollback_at: float | None = None
    kills: list = field(default_factory=list)  # {"phase", "at_s"}
    states: list = field(default_factory=list)  # (elapsed_s, state name) on every change


def run_guard_loadtest(schema: FeatureSchema, replicas: int = 2, tail: int = 24_000, concurrency: int = 4,
                       kill_during_hold: bool = True, kill_during_rollback: bool = True,
                       dense_interval_s: float = 5.0, snapshot_interval_s: float = 30.0, timeout_s: float = 120.0,
                       seed: int = 0, work_dir: Path | None = None, settle_s: float = 180.0) -> dict:
    from trainer.online import train_batch

    started = time.monotonic()
    if work_dir is not None and Path(work_dir).exists() and any(Path(work_dir).iterdir()):
        raise ValueError(f"--work-dir requires an empty or absent directory, got {work_dir} (it holds files)")
    examples = load_dataset("ml-100k", schema)
    if not 3_000 <= tail <= len(examples) // 2:
        raise ValueError(f"--tail requires 3000..{len(examples) // 2} ratings, got {tail}")
    head, replay = _recent(examples.slice(0, len(examples) - tail)), examples.slice(len(examples) - tail, len(examples))
    scenario = poison_scenario(schema, head, replay, seed)
    poison_fids = _poison_only_fids(examples, scenario)
    with ExitStack() as stack:
        root = Path(work_dir) if work_dir is not None else \
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="monolith-guard-")))
        _say("starting a 3-node NATS JetStream cluster")
        bus = stack.enter_context(spawn_bus_stack(root, replicas=0, trainer=False))
        _say(f"batch training on {len(head):,} ratings; the snapshot goes to the bus")
        batch, _ = train_batch(schema, head.__class__(*_concat(head, replay)), root / "trainer",
                               train_fraction=(len(head) + 0.5) / (len(head) + len(replay)), progress=True,
                               bus=bus.bus("trainer"))
        _say(f"starting {replicas} serving replicas and the online trainer")
        for k in range(replicas):
            bus.start_replica(f"r{k}")
        trainer_args = dict(data_dir=root / "trainer", window_s=2.0, negative_rate=0.1,
                            extra=("--dense-interval-s", str(dense_interval_s),
                                   "--snapshot-interval-s", str(snapshot_interval_s)))
        bus.wait_trainer_ready(bus.start_trainer(**trainer_args))

        observer = _StreamObserver(bus, poison_fids)
        observer.start()
        watch = _Watch()
        done = threading.Event()
        watcher = threading.Thread(target=_watch_guard, args=(bus, trainer_args, watch, done, started,
                                                              kill_during_hold, kill_during_rollback))
        watcher.start()
        try:
            _say(f"replaying {len(scenario.ex):,} ratings ({int((~scenario.real).sum()):,} of them poison, in the "
                 f"middle third) with {concurrency} clients")
            sent = _replay(bus, scenario, np.arange(len(scenario.ex)), concurrency, "replay")
            # A hold or rollback still open at the end would leave the trainer's newest snapshot behind what
            # the replicas serve: clean traffic (the tail's last real ratings again) until the guard is open.
            _say(f"settling: clean traffic until the guard has been open for {_SETTLED_S:.0f} s "
                 f"(at most {settle_s:.0f} s)")
            open_since, deadline = [None], time.monotonic() + settle_s
            clean = np.flatnonzero(scenario.real)[-_SETTLE_RATINGS:]
            settle = _replay(bus, scenario, np.resize(clean, 20 * len(clean)), concurrency, "settle",
                             stop=lambda: _settled(root / "trainer", open_since) or time.monotonic() > deadline)
        finally:
            done.set()
            watcher.join()
        settled = _settled(root / "trainer", open_since)
        rollbacks = _rollbacks(root / "trainer")
        observer.finish(max((r["end_seq"] for r in rollbacks), default=0), timeout_s)
        checks = _check_rollback(bus, observer, rollbacks[0], timeout_s) if rollbacks else \
            {"dense_restored": False, "poison_rows_emitted_before_hold": None}
        _say("quiescing: the trainer stops, the replicas catch up and are compared")
        compared = quiesce_and_compare(bus, timeout_s=timeout_s)
        state = read_state(root / "trainer") or {}
        served_poison = _poison_rows_served(bus, poison_fids)
    return {
        "replicas": replicas, "tail_ratings": tail, "poison_examples": int((~scenario.real).sum()),
        "batch": batch, "rollbacks": int(state.get("rollbacks", 0)), "holds": int(state.get("holds", 0)),
        "rollback_targets": [r["to_seq"] for r in rollbacks],  # one per append (a redo after a restart too)
        "held_s": None if watch.held_at is None or watch.rollback_at is None
        else round(watch.rollback_at - watch.held_at, 2),
        "poison_only_fids": int(poison_fids.shape[0]),
        "poison_rows_served_after_rollback": None, "poison_rows_served_at_end": served_poison,
        **checks, "stream_observer_error": observer.error,
        "replicas_identical": compared["replicas_identical"], "final_seq": compared["final_seq"],
        "tables": compared["per_replica"],
        "trainer_restarts": len(watch.kills), "kills": watch.kills,
        "guard_states": watch.states,
        "quarantined_sources": int(state.get("quarantined_sources", 0)),
        "requests": sent["requests"] + settle["requests"], "feedback": sent["feedback"] + settle["feedback"],
        "failed_requests": sent["failed_requests"] + settle["failed_requests"],
        "last_error": settle["last_error"] or sent["last_error"],
        "requests_per_s": round(sent["requests"] / max(sent["elapsed_s"], 1e-9), 1), "replay_s": sent["elapsed_s"],
        "settle_s": settle["elapsed_s"], "settled": settled, "elapsed_s": round(time.monotonic() - started, 1),
    }


def _say(message: str) -> None:
    print(f"[guard] {message}", file=sys.stderr, flush=True)


def _recent(head: Examples) -> Examples:
    """The batch ratings with their order kept and their times spread over the last hour (ML-100K's
    1997-98 times would put every batch row past its TTL at the first expiry pass)."""
    now = time.time()
    return Examples(head.user_fids, head.item_fids, head.labels, np.linspace(now - 3600, now - 60, len(head)),
                    head.user_ids, head.item_ids)


def _concat(head: Examples, replay: Examples) -> tuple:
    return tuple(np.concatenate([getattr(head, f), getattr(replay, f)]) for f in
                 ("user_fids", "item_fids", "labels", "times", "user_ids", "item_ids"))


def _poison_only_fids(examples: Examples, scenario) -> np.ndarray:
    """FIDs that only the poisoning sources send: rows trained on nothing but the poison."""
    fake = ~scenario.real
    sent = np.union1d(scenario.ex.user_fids[fake].ravel(), scenario.ex.item_fids[fake].ravel())
    real = np.union1d(examples.user_fids.ravel(), examples.item_fids.ravel())
    return np.setdiff1d(sent, real)


def _replay(bus: BusStack, scenario, indices, concurrency: int, tag: str, stop=None) -> dict:
    """Sends the scenario's examples ``indices`` in order from ``concurrency`` threads, replicas in turn,
    until they run out or ``stop()`` is true; returns counts."""
    from tqdm import tqdm

    ex, real = scenario.ex, scenario.real
    lock = threading.Lock()
    cursor = iter(enumerate(indices))
    counts = {"requests": 0, "feedback": 0, "failed_requests": 0, "last_error": ""}
    urls = [s.grpc_url for s in bus.servers]

    def worker(k: int) -> None:
        clients = [RankerClient(url, "grpc") for url in urls]
        try:
            while stop is None or not stop():
                with lock:
                    n, i = next(cursor, (None, None))
                if i is None:
                    return
                client = clients[(n + k) % len(clients)]
                rid = f"{tag}-{n}".encode()
                label = float(scenario.observed[i])
                try:
                    client.rank(ex.user_fids[i], ex.item_fids[i : i + 1], request_id=rid)
                    # A real rating < 4 is an impression without an action; the adversaries send both labels.
                    sent_feedback = not real[i] or label > 0
                    if sent_feedback:
                        client.feedback(rid, ex.item_fids[i : i + 1, 0], [label])
                except Exception as exc:  # counted, the replay goes on
                    with lock:
                        counts["failed_requests"] += 1
                        counts["last_error"] = str(exc)[:300]
                    continue
                with lock:
                    counts["requests"] += 1
                    counts["feedback"] += sent_feedback
                    bar.update(1)
        finally:
            for client in clients:
                client.close()

    t0 = time.monotonic()
    with tqdm(total=len(indices), unit="req", file=sys.stderr, desc=tag, mininterval=2.0) as bar:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.monotonic() - t0
    return {**counts, "elapsed_s": round(elapsed, 1)}


def _settled(data_dir: Path, open_since: list) -> bool:
    """True once the guard has been open for _SETTLED_S (``open_since``: a one-item list the caller keeps)."""
    state = read_state(data_dir) or {}
    if state.get("state") != "open" or state.get("unconfirmed_rollback"):
        open_since[0] = None
        return False
    open_since[0] = open_since[0] or time.monotonic()
    return time.monotonic() - open_since[0] >= _SETTLED_S


def _watch_guard(bus: BusStack, trainer_args: dict, watch: _Watch, done: threading.Event, started: float,
                 kill_during_hold: bool, kill_during_rollback: bool) -> None:
    """Polls the guard's state file; kills and restarts the trainer in the phases asked for."""
    import os
    import signal

    data_dir = trainer_args["data_dir"]
    last_name, rollbacks = None, None
    while not done.is_set():
        state = read_state(data_dir) or {}
        name = state.get("state")
        now = time.monotonic()
        if name != last_name:
            watch.states.append((round(now - started, 2), name))
            last_name = name
            if name is not None:  # the guard's state at every change, for a look afterwards (--work-dir)
                saved = data_dir.parent / "guard-states" / f"{len(watch.states):03d}-{name.split()[0]}.json"
                saved.parent.mkdir(exist_ok=True)
                saved.write_text(json.dumps(state))
        if rollbacks is None:
            rollbacks = int(state.get("rollbacks", 0))
        held = name in ("held", "held (rollback not done)")  # the guard's own, not the operator's or expiry's
        if held and watch.held_at is None:
            watch.held_at = now
        if int(state.get("rollbacks", 0)) > rollbacks and watch.rollback_at is None:
            watch.rollback_at = now
        phase = None
        if kill_during_hold and held and state.get("rollback_to") is None and not watch.kills:
            phase = "hold"
        elif kill_during_rollback and state.get("unconfirmed_rollback") and \
                not any(k["phase"] == "rollback" for k in watch.kills):
            phase = "rollback"
        if phase is not None:
            trainer = bus.trainers[-1]
            os.kill(trainer.pid, signal.SIGKILL)
            trainer.wait()
            watch.kills.append({"phase": phase, "at_s": round(now - started, 2),
                                "unconfirmed_rollback": state.get("unconfirmed_rollback")})
            _say(f"kill -9 of the trainer during the {phase}; restarting it")
            restarted = bus.start_trainer(**trainer_args)
            try:
                bus.wait_trainer_ready(restarted)
            except RuntimeError as exc:
                _say(f"the restarted trainer did not come up: {exc}")
            continue
        done.wait(_POLL_S)


def _rollbacks(data_dir: Path) -> list[dict]:
    """The rollbacks the trainer appended, from its log (every start appends to it)."""
    log = data_dir / "logs" / "trainer.log"
    out = []
    for m in _ROLLBACK_LINE.finditer(log.read_text(errors="replace")):
        out.append({"to_seq": int(m[1]), "last_seq": int(m[2]), "end_seq": int(m[3])})
    return out


def _dense_bytes(state) -> dict:
    return {k: np.asarray(v).tobytes() for k, v in state.items()}


class _StreamObserver(threading.Thread):
    """Follows the DELTAS stream from its start as a replica would, keeping what the checks need of
    each record while it is retained (retention drops what the next snapshot covers): the dense
    weights of every dense record, and the poison-only FIDs each sparse record wrote."""

    def __init__(self, bus: BusStack, poison_fids: np.ndarray):
        super().__init__(daemon=True)
        self.bus, self.poison_fids = bus, poison_fids
        self.dense: list[tuple[int, dict]] = []  # (seq, dense bytes)
        self.poison_written: list[tuple[int, np.ndarray]] = []  # (seq, the poison-only FIDs it wrote)
        self.live: set = set()  # poison-only FIDs with a row in the stream's state now
        self.live_after: list[tuple[int, frozenset]] = []  # (seq, live) after every record that changed it
        self.seq = 0
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        admin = self.bus.admin()
        try:
            reader = admin.open_delta_reader(0)
            while not self.stop.is_set():
                records = reader.read(max_records=256)
                if not records:
                    self.stop.wait(0.02)
                    continue
                for record in records:
                    self.seq = record.seq
                    if record.kind == DENSE:
                        self.dense.append((record.seq, _dense_bytes(record.dense_state)))
                    else:
                        written = self.poison_fids[np.isin(self.poison_fids, record.fids)]
                        gone = self.poison_fids[np.isin(self.poison_fids, record.evicted)]
                        if written.shape[0]:
                            self.poison_written.append((record.seq, written))
                        if written.shape[0] or gone.shape[0]:
                            self.live = (self.live | set(written.tolist())) - set(gone.tolist())
                            self.live_after.append((record.seq, frozenset(self.live)))
            reader.close()
        except Exception as exc:  # reported in the result, the run goes on
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            admin.close()

    def finish(self, until_seq: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.seq < until_seq and self.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop.set()
        self.join()


def _check_rollback(bus: BusStack, observer: _StreamObserver, first: dict, timeout_s: float) -> dict:
    """The first rollback's dense record against the dense weights at its target (the newest dense record
    at or before it, as the observer read them), the poison-only rows emitted before it, and whether every
    replica serves at or past its last record."""
    expected = [d for seq, d in observer.dense if seq <= first["to_seq"]]
    restored = [d for seq, d in observer.dense if first["last_seq"] < seq <= first["end_seq"]]
    applied = []
    for server in bus.servers:
        with RankerClient(server.grpc_url, "grpc") as client:
            deadline = time.monotonic() + timeout_s
            while served_seq(client) < first["end_seq"] and time.monotonic() < deadline:
                time.sleep(0.1)
            applied.append(served_seq(client) >= first["end_seq"])
    return {"dense_restored": bool(expected and restored) and restored[-1] == expected[-1] and all(applied),
            "rollback_dense_records": len(restored), "replicas_applied_rollback": all(applied),
            "poison_rows_emitted_before_hold": len({int(f) for seq, fids in observer.poison_written
                                                    if seq <= first["last_seq"] for f in fids}),
            # the stream's state at the rollback's last record: what every replica serves once it applied it
            "poison_rows_served_after_rollback": len(next((live for seq, live in reversed(observer.live_after)
                                                           if seq <= first["end_seq"]), frozenset()))}


def _poison_rows_served(bus: BusStack, poison_fids: np.ndarray) -> int:
    """Poison-only FIDs present in any replica's final table (its snapshot at the quiesced seq)."""
    from server.streams.snapshots import load_latest_snapshot

    present = 0
    for server in bus.servers:
        snapshot = load_latest_snapshot(server.data_dir)
        if snapshot is None:
            continue
        _, found = snapshot.table.lookup_found(poison_fids)
        present += int(found.sum())
    return present


def format_guard(r: dict) -> str:
    return (f"quality guard on the JetStream bus, {r['replicas']} replicas, {r['requests']:,} requests "
            f"({r['poison_examples']:,} poison) in {r['replay_s']} s:\n"
            f"  rollbacks {r['rollbacks']} (to seq {r['rollback_targets']}), held {r['held_s']} s before it; "
            f"holds {r['holds']}\n"
            f"  poison-only rows emitted before the hold {r['poison_rows_emitted_before_hold']}, served after the "
            f"rollback {r['poison_rows_served_after_rollback']}, at the end {r['poison_rows_served_at_end']} (of "
            f"{r['poison_only_fids']} poison-only FIDs, rows summed over the replicas)\n"
            f"  dense weights restored {r['dense_restored']}; replicas identical {r['replicas_identical']}; "
            f"trainer restarts {r['trainer_restarts']} ({', '.join(k['phase'] for k in r['kills']) or 'none'}); "
            f"failed requests {r['failed_requests']}")
