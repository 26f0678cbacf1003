"""``monolith-rt loadtest mlperf``: MLPerf Inference LoadGen against `monolith-rt serve`.

LoadGen (``mlcommons-loadgen``, MLPerf Inference's own load generator, C++)
owns the clock: it schedules the queries (Poisson arrivals at
``target_qps`` in the Server scenario, every query at once in Offline),
times each from its scheduled issue to its completion, and writes
``mlperf_log_summary.txt`` / ``mlperf_log_detail.txt`` with a VALID/INVALID
verdict. This module gives it the two things it asks for:

    QSL (query sample library)   the MovieLens replay: sample i is the i-th
                                 rating of the held-out last 20% (time
                                 order), as a ranking request: that user's
                                 features, the rated movie and
                                 ``candidates - 1`` other movies of the data
                                 set. LoadGen loads ``performance_samples`` of
                                 them before the timed run (their tensors are
                                 encoded then, not on the hot path) and
                                 draws queries from those.
    SUT (system under test)      one ranking request per query, over gRPC or
                                 HTTP, through the validating front (with the
                                 API key if set), to the ``ranker`` (or
                                 ``baseline``) model.

Concurrency contract: LoadGen's issue thread calls ``issue_query``, which
only hands the (query id, sample index) pairs to an asyncio loop running in
a thread of its own (``call_soon_threadsafe``) and returns: LoadGen's
thread never waits on the network, so its schedule is kept and a slow
answer is charged to the query, not to the queries after it. The loop
sends with tritonclient's asyncio clients, at most ``max_in_flight``
requests at a time (Offline hands over every query in one call), and
completes each query (``QuerySamplesComplete``) when its answer arrives, or
when it fails: a failure is counted by kind in ``errors`` (so LoadGen's
latency figures still cover every query) and a run with errors exits
non-zero. Every request has a client timeout, so every query completes.

Bounds: LoadGen stops issuing at ``min_duration_s`` (``max_duration_ms``
is set to twice that, ``max_query_count`` to twice the queries the target
rate asks for); Offline issues ``target_qps * min_duration_s * 1.1``
queries. ``find_peak`` is LoadGen's FindPeakPerformance mode (Server only):
from ``target_qps`` it doubles the rate until a run is INVALID, then
bisects to integer QPS, every step a full run of ``min_duration_s``; its
last run, at the peak it found, is the summary it writes.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from loadtest.latency import populate_snapshot
from loadtest.stack import target_url
from server.features import FeatureSchema

SCENARIOS = ("server", "offline")
_OFFLINE_OVERISSUE = 1.1  # LoadGen's own factor for Offline's one query
_CLIENT_TIMEOUT_S = 10.0
_WARM_UP_REQUESTS = 32  # uncounted, one after another, before LoadGen starts


@dataclass(frozen=True)
class MlperfConfig:
    """What `loadtest mlperf` runs; validated once, here."""

    url: str | None = None  # None: spawn `monolith-rt serve` on a temporary data dir
    protocol: str = "grpc"
    scenario: str = "server"
    target_qps: float = 50.0  # Server: the arrival rate (find_peak: where the search starts); Offline: expected QPS
    p99_ms: float = 60.0  # Server: LoadGen's latency constraint at the 99th percentile
    min_duration_s: float = 600.0
    find_peak: bool = False
    candidates: int = 100
    baseline: bool = False
    max_in_flight: int = 64
    performance_samples: int = 2048
    dataset: str = "ml-100k"
    report_dir: str = "reports/mlperf"
    run: str | None = None  # the log folder under report_dir (default: UTC time + scenario)
    seed: int = 0
    api_key: str | None = None

    def __post_init__(self):
        if self.protocol not in ("grpc", "http"):
            raise ValueError(f"protocol requires grpc or http, got {self.protocol!r}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario requires one of {SCENARIOS}, got {self.scenario!r}")
        if self.find_peak and self.scenario != "server":
            raise ValueError("--find-peak requires --scenario server (LoadGen searches the Server rate)")
        for name in ("target_qps", "p99_ms", "min_duration_s", "candidates", "max_in_flight",
                     "performance_samples"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} requires > 0, got {getattr(self, name)}")
        if self.run is not None and (not self.run or "/" in self.run or self.run.startswith(".")):
            raise ValueError(f"run requires a plain folder name, got {self.run!r}")


@dataclass(frozen=True)
class Replay:
    """The QSL's samples: ranking requests from the held-out tail of a MovieLens replay.
    Shapes: S samples, C candidates, Wu / Wi FIDs per user / item."""

    user_fids: np.ndarray  # uint64[S, Wu]
    rated_item_fids: np.ndarray  # uint64[S, Wi]: the movie the user rated, candidate 0
    item_pool: np.ndarray  # uint64[P, Wi]: every rating's movie, where the other candidates come from
    others: np.ndarray  # int64[S, C-1]: rows of item_pool

    def __len__(self) -> int:
        return self.user_fids.shape[0]

    def request(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(user_fids uint64[Wu], item_fids uint64[C, Wi]) of sample i."""
        return self.user_fids[i], np.concatenate([self.rated_item_fids[i : i + 1], self.item_pool[self.others[i]]])


def replay_requests(schema: FeatureSchema, dataset: str, candidates: int, seed: int) -> Replay:
    """The last 20% of ``dataset``'s ratings in time order (the demo's live part), as requests."""
    from trainer.data import load_dataset

    examples = load_dataset(dataset, schema)
    tail = examples.slice(int(len(examples) * 0.8), len(examples))
    rng = np.random.default_rng(seed)
    others = rng.integers(0, len(examples), (len(tail), candidates - 1))
    return Replay(tail.user_fids, tail.item_fids, examples.item_fids, others)


class _AsyncSender:
    """The SUT's sending half: an asyncio loop in its own thread, a tritonclient asyncio client,
    at most ``max_in_flight`` requests out. ``issue`` may be called from any thread and never blocks."""

    def __init__(self, url: str, protocol: str, model: str, api_key: str | None, max_in_flight: int,
                 candidates: int, complete):
        self._protocol, self._model, self._candidates, self._complete = protocol, model, candidates, complete
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        if protocol == "grpc":
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.http.aio as module
        self._module = module
        self._inputs: dict[int, list] = {}  # sample index -> [user_fids, item_fids] InferInputs (the loaded samples)
        self.errors: Counter = Counter()
        self._tasks: set = set()
        self._sent = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mlperf-sut", daemon=True)
        self._thread.start()
        self._client, self._slots = asyncio.run_coroutine_threadsafe(self._open(url, max_in_flight),
                                                                     self._loop).result()

    async def _open(self, url: str, max_in_flight: int):
        if self._protocol == "grpc":
            client = self._module.InferenceServerClient(url)
        else:
            client = self._module.InferenceServerClient(url, conn_limit=max_in_flight, conn_timeout=_CLIENT_TIMEOUT_S)
        return client, asyncio.Semaphore(max_in_flight)

    def _tensors(self, user_fids: np.ndarray, item_fids: np.ndarray) -> list:
        tensors = []
        for name, array in (("user_fids", user_fids[None]), ("item_fids", item_fids[None])):
            tensor = self._module.InferInput(name, list(array.shape), "UINT64")
            tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.uint64))
            tensors.append(tensor)
        return tensors

    def load(self, index: int, user_fids: np.ndarray, item_fids: np.ndarray) -> None:
        self._inputs[index] = self._tensors(user_fids, item_fids)

    def unload(self, index: int) -> None:
        self._inputs.pop(index, None)

    def issue(self, samples) -> None:  # LoadGen's thread: hand over and return
        pairs = [(s.id, s.index) for s in samples]
        self._loop.call_soon_threadsafe(self._start, pairs)

    def _start(self, pairs) -> None:
        for query_id, index in pairs:
            task = self._loop.create_task(self._one(query_id, index))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one(self, query_id: int, index: int) -> None:
        async with self._slots:
            self._sent += 1
            request_id = self._module.InferInput("request_id", [1, 1], "BYTES")
            request_id.set_data_from_numpy(np.array([[f"mlperf-{self._sent}".encode()]], dtype=np.object_))
            try:
                kwargs = {"client_timeout": _CLIENT_TIMEOUT_S} if self._protocol == "grpc" else {}
                result = await self._client.infer(
                    self._model, [*self._inputs[index], request_id],
                    outputs=[self._module.InferRequestedOutput("scores")], headers=self._headers, **kwargs)
                scores = result.as_numpy("scores")
                if scores is None or scores.shape != (1, self._candidates):
                    self.errors[f"scores shape {None if scores is None else scores.shape}"] += 1
            except Exception as exc:  # every query completes; failures are counted by kind
                self.errors[_error_kind(exc)] += 1
        self._complete(query_id)

    def warm_up(self, requests) -> None:
        """Sends each of ``requests`` once, one after another, uncounted: connections, the server's
        first calls and this loop are warm when LoadGen's clock starts."""
        async def run():
            for tensors in [self._tensors(u, i) for u, i in requests]:
                request_id = self._module.InferInput("request_id", [1, 1], "BYTES")
                request_id.set_data_from_numpy(np.array([[b"mlperf-warm-up"]], dtype=np.object_))
                try:
                    await self._client.infer(self._model, [*tensors, request_id],
                                             outputs=[self._module.InferRequestedOutput("scores")],
                                             headers=self._headers)
                except Exception:  # a lasting failure is counted in the run itself
                    pass

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=len(requests) * _CLIENT_TIMEOUT_S)

    def close(self) -> None:
        async def finish():
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2 * _CLIENT_TIMEOUT_S)
            await self._client.close()

        asyncio.run_coroutine_threadsafe(finish(), self._loop).result(timeout=3 * _CLIENT_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def _error_kind(exc: Exception) -> str:
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return f"{type(exc).__name__}: {str(message).split(':')[0][:80]}"


_SUMMARY_FIELDS = {  # summary line -> (key, parse)
    "Result is": ("result", str),
    "Completed samples per second": ("achieved_qps", float),  # Server
    "Samples per second": ("achieved_qps", float),  # Offline
    "50.00 percentile latency (ns)": ("p50_ms", lambda v: int(v) / 1e6),
    "99.00 percentile latency (ns)": ("p99_ms", lambda v: int(v) / 1e6),
    "Performance constraints satisfied": ("performance_constraints_satisfied", lambda v: v == "Yes"),
    "Min duration satisfied": ("min_duration_satisfied", lambda v: v == "Yes"),
    "Min queries satisfied": ("min_queries_satisfied", lambda v: v == "Yes"),
    "Early stopping satisfied": ("early_stopping_satisfied", lambda v: v == "Yes"),
    "target_qps": ("target_qps", float),
    "Scenario": ("scenario", str),
    "Mode": ("mode", str),
}
_SUMMARY_LINE = re.compile(r"^\s*([^:]+?)\s*:\s*(\S+)\s*$")


def parse_summary(text: str) -> dict:
    """The figures of an ``mlperf_log_summary.txt``, as LoadGen wrote them (latencies in ms)."""
    out: dict = {}
    for line in text.splitlines():
        match = _SUMMARY_LINE.match(line)
        if match and match.group(1) in _SUMMARY_FIELDS:
            key, parse = _SUMMARY_FIELDS[match.group(1)]
            out.setdefault(key, parse(match.group(2)))
    if "result" not in out:
        raise ValueError("requires an MLPerf summary with a 'Result is' line, got none")
    return out


def _settings(config: MlperfConfig):
    import mlperf_loadgen as lg

    settings = lg.TestSettings()
    settings.min_duration_ms = int(config.min_duration_s * 1000)
    settings.max_duration_ms = 2 * settings.min_duration_ms
    settings.min_query_count = 1  # the duration decides; LoadGen's early stopping still asks for enough queries
    for name in ("qsl_rng_seed", "sample_index_rng_seed", "schedule_rng_seed"):
        setattr(settings, name, config.seed)
    if config.scenario == "server":
        settings.scenario = lg.TestScenario.Server
        settings.server_target_qps = config.target_qps
        settings.server_target_latency_ns = int(config.p99_ms * 1e6)
        settings.server_target_latency_percentile = 0.99
        settings.max_query_count = int(2 * config.target_qps * config.min_duration_s) + 1000
        if config.find_peak:
            settings.max_query_count = 0  # the search raises the rate; max_duration_ms bounds each step
            settings.server_find_peak_qps_decimals_of_precision = 0
    else:
        settings.scenario = lg.TestScenario.Offline
        settings.offline_expected_qps = config.target_qps
    settings.mode = lg.TestMode.FindPeakPerformance if config.find_peak else lg.TestMode.PerformanceOnly
    return settings


def run_loadgen(replay: Replay, url: str, model: str, config: MlperfConfig, log_dir: Path) -> dict:
    """One LoadGen test against ``model`` at ``url``; LoadGen's logs go to ``log_dir``."""
    import mlperf_loadgen as lg

    log_dir.mkdir(parents=True, exist_ok=True)

    def complete(query_id: int) -> None:
        lg.QuerySamplesComplete([lg.QuerySampleResponse(query_id, 0, 0)])

    sender = _AsyncSender(url, config.protocol, model, config.api_key, config.max_in_flight, config.candidates,
                          complete)
    sut = lg.ConstructSUT(sender.issue, lambda: None)
    qsl = lg.ConstructQSL(len(replay), min(len(replay), config.performance_samples),
                          lambda indices: [sender.load(i, *replay.request(i)) for i in indices],
                          lambda indices: [sender.unload(i) for i in indices])
    log = lg.LogSettings()
    log.log_output.outdir = str(log_dir)
    log.log_output.copy_summary_to_stdout = False
    log.enable_trace = False
    started = time.monotonic()
    try:
        sender.warm_up([replay.request(i) for i in range(min(len(replay), _WARM_UP_REQUESTS))])
        lg.StartTestWithLogSettings(sut, qsl, _settings(config), log)
    finally:
        sender.close()
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
    summary_path = log_dir / "mlperf_log_summary.txt"
    if not summary_path.is_file() or "Result is" not in summary_path.read_text():
        raise RuntimeError(f"LoadGen wrote no verdict for {model}; its errors are in {log_dir / 'mlperf_log_detail.txt'}"
                           " (with --find-peak, --target-qps must itself give a VALID run)")
    summary = parse_summary(summary_path.read_text())
    return {"model": model, **summary, "errors": int(sum(sender.errors.values())),
            "errors_by_kind": dict(sender.errors), "wall_s": round(time.monotonic() - started, 1),
            "log_dir": str(log_dir)}


def run_mlperf(schema: FeatureSchema, config: MlperfConfig) -> dict:
    """LoadGen against the ranker (and, with ``baseline``, the baseline model after it, same settings);
    returns the one JSON object the command prints."""
    replay = replay_requests(schema, config.dataset, config.candidates, config.seed)
    run = config.run or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{config.scenario}" + (
        "-peak" if config.find_peak else "")
    root = Path(config.report_dir) / run
    models = ["ranker"] + (["baseline"] if config.baseline else [])
    results = {}
    with ExitStack() as stack:
        every_fid = [(replay.user_fids.ravel(), replay.item_pool)]  # the snapshot holds a row for each
        target = target_url(stack, config.url, config.protocol, "mlperf",
                            prepare=populate_snapshot(schema, every_fid, config.seed))
        for model in models:
            print(f"[mlperf] {config.scenario}{' find-peak' if config.find_peak else ''} on {model}, "
                  f"logs in {root / model}", file=sys.stderr, flush=True)
            results[model] = run_loadgen(replay, target.url, model, config, root / model)
    main = results["ranker"]
    out = {"scenario": config.scenario, "find_peak": config.find_peak, "target_qps": main.get("target_qps"),
           "result": main["result"], "achieved_qps": main.get("achieved_qps"), "p50_ms": main.get("p50_ms"),
           "p99_ms": main.get("p99_ms"), "errors": main["errors"], "candidates": config.candidates,
           "protocol": config.protocol, "p99_bound_ms": config.p99_ms if config.scenario == "server" else None,
           "min_duration_s": config.min_duration_s, "dataset": config.dataset, "log_dir": str(root),
           "ranker": main}
    if "baseline" in results:
        base = results["baseline"]
        out["baseline"] = base
        out["achieved_qps_ratio_vs_baseline"] = _ratio(main.get("achieved_qps"), base.get("achieved_qps"))
        out["p99_ratio_vs_baseline"] = _ratio(main.get("p99_ms"), base.get("p99_ms"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "result.json").write_text(json.dumps({**out, "config": asdict(config) | {"api_key": None}}, indent=2))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def format_summary_line(result: dict) -> str:
    """One human line per model, for stderr; stdout carries the JSON line."""
    lines = []
    for model in ("ranker", "baseline"):
        if model in result:
            r = result[model]
            lines.append(f"[mlperf] {model}: {r['scenario']} {r['mode']}, target_qps {r.get('target_qps')}: "
                         f"{r['result']}, {r.get('achieved_qps')} samples/s, p50 {r.get('p50_ms'):.2f} ms, "
                         f"p99 {r.get('p99_ms'):.2f} ms, errors {r['errors']} ({r['log_dir']})")
    return "\n".join(lines)
