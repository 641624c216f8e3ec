"""A run's ``metrics.jsonl``, written where the steps are driven (the controller), in step with
its checkpoints: one JSON row per finished step (``HistoryRow.to_dict``), appended and flushed as
the step ends, one row per failure (``faults.Failure.to_dict``, ``"event": "failure"``) and one
per return to the whole cluster after an elastic restart (``"event": "grow"``).

A run that resumes from the checkpoint of step S (after a restart by hand or a recovery) first
drops the step rows past S, which it will train again, so the file holds one row per step,
always, whoever died when. Event rows are kept: they are the run's record of what happened.

Every row is on disk whole or not at all (``storage.append_whole``), so a reader of the live
file never meets half a row, and a write the disk refuses is one ``StorageError`` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

from ma_ray.control.faults import FAILURE_EVENT
from ma_ray.storage import append_whole, storage_error

GROW_EVENT = "grow"


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def rows(self) -> List[dict]:
        """The rows on disk; a line cut short by a crash mid-write is left out."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def failures(self) -> List[dict]:
        return [r for r in self.rows() if r.get("event") == FAILURE_EVENT]

    def rewind(self, last_step: int) -> None:
        """Keep the step rows up to ``last_step`` (-1: none) and every event row, replacing the
        file atomically."""
        kept = [r for r in self.rows() if "event" in r or r.get("step", -1) <= last_step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise storage_error(exc.filename or self.path, exc) from None

    def append(self, row: dict) -> None:
        append_whole(self.path, (json.dumps(row) + "\n").encode())
