"""Whose clock: the server's. A client's time is accepted only within a window around it.

Every row of the embedding table carries the time of its last update, and
expiry measures ages from the newest of those times (server.table.local).
Those times come from requests: the ranker's ``timestamp`` input and the
feedback's ``event_time`` (both optional; absent means the server's receive
time). One request stamped a month ahead would move the newest time a month
ahead and make every row look a month old. So live serving accepts a
client's time only within

    receive time - behind_s  <=  t  <=  receive time + ahead_s

(defaults 300 s ahead, one day behind) and refuses the request otherwise
(INVALID_ARG, naming the value, the window and the flags). ``inf`` opens a
side: replays through the server of recorded or simulated times (``monolith-rt
demo``, ``loadtest soak``) run ``serve --max-time-behind-s inf``. The trainer
bounds its own expiry clock by its wall clock + ``ahead_s`` as well
(trainer.online), whatever the logs say.

The window reaches the models inside tritonserver through the environment
(``monolith-rt serve`` exports it; see ``ENV``), else the model parameters
of the same names, else the defaults: the same ``model_repository/`` runs
under a stock tritonserver.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

DEFAULT_AHEAD_S = 300.0
DEFAULT_BEHIND_S = 86400.0
ENV = {"ahead_s": "MONOLITH_MAX_TIME_AHEAD_S", "behind_s": "MONOLITH_MAX_TIME_BEHIND_S"}
PARAMETERS = {"ahead_s": "max_time_ahead_s", "behind_s": "max_time_behind_s"}
FLAGS = {"ahead_s": "--max-time-ahead-s", "behind_s": "--max-time-behind-s"}


@dataclass(frozen=True)
class TimeWindow:
    """How far a client's time may be ahead of / behind the server's receive time, in seconds."""

    ahead_s: float = DEFAULT_AHEAD_S
    behind_s: float = DEFAULT_BEHIND_S

    def __post_init__(self):
        for name in ("ahead_s", "behind_s"):
            value = getattr(self, name)
            if not value >= 0:  # nan fails too; inf opens that side
                raise ValueError(f"{FLAGS[name]} requires seconds >= 0 (inf: no limit), got {value}")

    def refusal(self, t: float, now_s: float) -> str | None:
        """Why ``t`` is outside the window around ``now_s``, or None when it is inside."""
        if t - now_s > self.ahead_s:
            return f"{_span(t - now_s)} ahead of"
        if now_s - t > self.behind_s:
            return f"{_span(now_s - t)} behind"
        return None

    def describe(self) -> str:
        """"300 s ahead of and 86400 s behind" ("any time" for inf)."""
        def side(value: float) -> str:
            return "any time" if math.isinf(value) else f"{value:g} s"

        return f"{side(self.ahead_s)} ahead of and {side(self.behind_s)} behind"

    def to_env(self) -> dict[str, str]:
        """The environment from which ``from_settings`` (in the model processes) reads this window."""
        return {ENV[name]: repr(float(getattr(self, name))) for name in ENV}

    @classmethod
    def from_settings(cls, params: Mapping[str, str] | None = None,
                      environ: Mapping[str, str] = os.environ) -> "TimeWindow":
        """From the environment, else the model parameters, else the defaults. Raises ValueError
        naming the setting when one is not a number >= 0."""
        values = {}
        for name in ENV:
            text = environ.get(ENV[name]) or (params or {}).get(PARAMETERS[name])
            if text is None:
                continue
            try:
                values[name] = float(text)
            except ValueError:
                raise ValueError(f"{ENV[name]} (or parameter {PARAMETERS[name]}) requires seconds >= 0, "
                                 f"got {text!r}") from None
        return cls(**values)


def _span(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} s"

