"""Counts of completions shown and accepted, kept in a small JSON file on this machine only.

"Shown" counts suggestions computed by the model and returned to the editor (answering the rest
of one while the user types through it does not count again); "accepted" counts
`stablelm.accepted` commands for ids that were shown, each id once.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from stablelm_lsp.inference.lru import LRU

log = logging.getLogger(__name__)

_REMEMBERED_IDS = 1024     # shown ids an accept may refer to
_WRITE_INTERVAL_S = 2.0    # "shown" is written at most this often; accepts are written at once


class Stats:
    """Thread-safe counters; several servers may share the file: each adds what it counted since
    its last write to what the file holds then."""

    def __init__(self, path: Path):
        self.path = path
        self._saved = self._read()                 # [shown, accepted] as of the last read/write
        self._pending = [0, 0]                     # counted since
        self._ids: LRU[str, bool] = LRU(_REMEMBERED_IDS)    # shown id -> accepted already
        self._lock = threading.Lock()
        self._written_at = 0.0

    def _read(self) -> list[int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return [int(data.get("completionsShown", 0)), int(data.get("completionsAccepted", 0))]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("stats file %s unreadable (%s); counting from zero", self.path, exc)
        return [0, 0]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"completionsShown": self._saved[0] + self._pending[0],
                    "completionsAccepted": self._saved[1] + self._pending[1]}

    def record_shown(self, completion_id: str) -> None:
        with self._lock:
            self._pending[0] += 1
            self._ids.put(completion_id, False)
        if time.monotonic() - self._written_at >= _WRITE_INTERVAL_S:
            self.flush()

    def record_accepted(self, completion_id: str) -> bool:
        """Count an accept; False for an id never shown (or forgotten) or already accepted."""
        with self._lock:
            if self._ids.get(completion_id) is not False:
                return False
            self._ids.put(completion_id, True)
            self._pending[1] += 1
        self.flush()
        return True

    def flush(self) -> None:
        with self._lock:
            if self._pending == [0, 0]:
                return
            saved = self._read()
            data = {"completionsShown": saved[0] + self._pending[0],
                    "completionsAccepted": saved[1] + self._pending[1]}
            self._written_at = time.monotonic()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".stats-", suffix=".json")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f)
                os.replace(tmp, self.path)
            except OSError as exc:
                log.warning("could not write stats file %s: %s", self.path, exc)
                return
            self._saved = [data["completionsShown"], data["completionsAccepted"]]
            self._pending = [0, 0]
