"""Latency recording in an HDR histogram (microsecond resolution, 3 significant digits)."""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

_LOWEST_US = 1
_HIGHEST_US = 60_000_000
_DIGITS = 3


class LatencyHistogram:
    def __init__(self):
        self._h = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)

    def record_ms(self, latency_ms: float) -> None:
        self._h.record_value(min(_HIGHEST_US, max(_LOWEST_US, int(round(latency_ms * 1000)))))

    def add(self, other: "LatencyHistogram") -> None:
        self._h.add(other._h)

    @property
    def count(self) -> int:
        return self._h.get_total_count()

    def percentile_ms(self, q: float) -> float:
        return self._h.get_value_at_percentile(q) / 1000.0

    def summary(self) -> dict:
        if self.count == 0:
            return {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
        return {"count": self.count,
                **{name: round(self.percentile_ms(q), 3) for name, q in
                   (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("p999_ms", 99.9))},
                "max_ms": round(self._h.get_max_value() / 1000.0, 3)}
