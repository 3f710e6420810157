"""How long a completion request waits before it runs the model: adapted to the user's typing
rhythm and the model's measured latency, within the bounds the settings set (`debounceMinMs`,
`debounceMs`). Tabby adapts its debounce the same way.

Waiting exists so that the model does not run for keystrokes the next one makes stale. When a
run takes less than the usual gap between this user's keystrokes, its answer is there before the
next key: there is no reason to wait, and the lower bound applies. When runs take longer, the
request waits about one usual gap (within the bounds): if another key comes meanwhile, nothing
was started for nothing. Without enough keystrokes or runs measured yet, the upper bound applies,
the fixed debounce of before.
"""
from __future__ import annotations

import statistics
import time
from collections import deque

GAPS = 8                   # gaps between keystrokes remembered per document
PAUSE_S = 1.0              # a longer gap is a pause, not the typing rhythm
LATENCY_WEIGHT = 0.3       # weight of the newest run in the latency's moving average


class AdaptiveDebounce:
    """Keystroke gaps per document and a moving average of model-run times."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._last_edit: dict[str, float] = {}
        self._gaps: dict[str, deque[float]] = {}
        self.latency_s: float | None = None
        self.last_delay_s: float | None = None     # the latest delay chosen (for the status)

    def edited(self, uri: str) -> None:
        now = self._clock()
        last = self._last_edit.get(uri)
        self._last_edit[uri] = now
        if last is not None and now - last < PAUSE_S:
            self._gaps.setdefault(uri, deque(maxlen=GAPS)).append(now - last)

    def ran(self, elapsed_s: float) -> None:
        """A request that ran the model took `elapsed_s`."""
        if self.latency_s is None:
            self.latency_s = elapsed_s
        else:
            self.latency_s += LATENCY_WEIGHT * (elapsed_s - self.latency_s)

    def forget(self, uri: str) -> None:
        self._last_edit.pop(uri, None)
        self._gaps.pop(uri, None)

    def delay(self, uri: str, low_s: float, high_s: float) -> float:
        """Seconds to wait before running the model for document `uri`."""
        low_s = min(low_s, high_s)
        gaps = self._gaps.get(uri)
        if self.latency_s is None or not gaps or len(gaps) < 3:
            delay = high_s
        else:
            gap = statistics.median(gaps)
            delay = low_s if self.latency_s + low_s < gap else min(max(gap, low_s), high_s)
        self.last_delay_s = delay
        return delay
