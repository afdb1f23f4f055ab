"""The invalid-rate alarm: a judge whose recent votes are mostly invalid is broken (a wrong template, a
budget too small for the model, a policy that learned to make the judge answer nothing), and the
rewards computed from it are noise. Invalid votes are already reported per comparison and never count
for either side; the alarm makes a run of them impossible to miss: a metric that any caller can read
(`Judge.invalid_alarm.metrics()`) and one RuntimeWarning, the first time the window trips.

Window: the last `window` votes the judge finished (aborted votes of an adaptive stop are not votes;
a comparison that failed with an error has none). The alarm is raised while the window is full and
more than `threshold` of it is invalid (no verdict read or forced), and lowered when that stops being
so; `trips` counts the times it was raised.
"""
from __future__ import annotations

import threading
import warnings
from collections import deque
from typing import Any, Iterable

DEFAULT_WINDOW = 64
DEFAULT_THRESHOLD = 0.5


class InvalidRateAlarm:
    def __init__(self, window: int = DEFAULT_WINDOW, threshold: float = DEFAULT_THRESHOLD, name: str = "judge"):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
        self.window, self.threshold, self.name = window, float(threshold), name
        self._recent: deque[bool] = deque(maxlen=window)  # True: invalid
        self._invalid = 0  # invalid votes in _recent
        self.votes = 0  # votes seen in all
        self.invalid = 0  # invalid votes seen in all
        self.raised = False
        self.trips = 0
        self.warned = False
        # comparisons finish on several event loops (threads) at once
        self._lock = threading.Lock()

    def record(self, votes: Iterable[Any]) -> bool:
        """Count the finished votes of one comparison (objects with a `verdict`, None when invalid).
        Returns whether the alarm is raised after them."""
        warn = None
        with self._lock:
            for v in votes:
                bad = v.verdict is None
                if len(self._recent) == self.window:
                    self._invalid -= self._recent[0]
                self._recent.append(bad)
                self._invalid += bad
                self.votes += 1
                self.invalid += bad
            now = len(self._recent) == self.window and self._invalid > self.threshold * self.window
            if now and not self.raised:
                self.trips += 1
                if not self.warned:
                    self.warned = True
                    warn = (f"rrm_engine {self.name}: {self._invalid} of the last {self.window} votes were invalid "
                            f"(more than {self.threshold:.0%}): the judge is giving no verdicts (check the chat "
                            "template, max_tokens, the model; Comparison.invalid_reasons says why). Rewards from "
                            "these comparisons carry little signal. Warned once; see judge.invalid_alarm.metrics().")
            self.raised = now
        if warn is not None:
            warnings.warn(warn, RuntimeWarning, stacklevel=2)
        return now

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            n = len(self._recent)
            return {"invalid_alarm": self.raised, "invalid_alarm_trips": self.trips,
                    "window_votes": n, "window_invalid": self._invalid,
                    "window_invalid_rate": self._invalid / n if n else 0.0,
                    "votes": self.votes, "invalid": self.invalid,
                    "window": self.window, "threshold": self.threshold}
