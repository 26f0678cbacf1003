"""The joiner's figures as Prometheus text in ``<data_dir>/joiner/metrics.prom``.

For a node-exporter textfile collector, like the guard's metrics; the online
trainer rewrites the file atomically every stats interval:

    monolith_joiner_buffer_bytes          what the buffer holds (trainer.joiner: records + allowance per entry)
    monolith_joiner_buffer_limit_bytes    the limit past which it sheds (--join-buffer-mb)
    monolith_joiner_buffered_impressions  impressions waiting for their window to close
    monolith_joiner_total{counter=...}    every running total of trainer.joiner.COUNTERS (shed_*,
                                          duplicates, ambiguous, refused_labels, ...)
"""

from __future__ import annotations

from pathlib import Path

from trainer.joiner import COUNTERS, Joiner

JOINER_DIR = "joiner"
METRICS_FILE = "metrics.prom"


def write_joiner_metrics(data_dir: str | Path, joiner: Joiner) -> Path:
    from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile

    registry = CollectorRegistry()
    Gauge("monolith_joiner_buffer_bytes", "Bytes the join buffer holds (records + a fixed allowance per entry)",
          registry=registry).set(joiner.buffer_bytes)
    Gauge("monolith_joiner_buffer_limit_bytes", "Join buffer size past which the oldest entries are shed",
          registry=registry).set(joiner.max_buffer_bytes)
    Gauge("monolith_joiner_buffered_impressions", "Impressions waiting for their join window to close",
          registry=registry).set(joiner.buffered)
    totals = Counter("monolith_joiner", "Joiner running totals (trainer.joiner)", ["counter"], registry=registry)
    for name, value in joiner.counters().items():
        totals.labels(counter=name).inc(value)
    assert set(joiner.counters()) == set(COUNTERS)
    path = Path(data_dir) / JOINER_DIR / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
    return path
