"""Where a disaggregated request's time goes on each rank: stage marks per request, one log line when it
leaves the rank. Off unless TANDEM_TIMELINE=1 (read at import): marking then costs a dict lookup.

The line carries the wall-clock time of the first mark, so lines of the prefill and the decode rank of
one host line up: `timeline decode rid=... t0=1795455679.256129 reserved=+0.31ms landed=+9.80ms ...`.
"""

from __future__ import annotations

import logging
import os
import time

ENABLED = os.environ.get("TANDEM_TIMELINE") == "1"
log = logging.getLogger("tandem.timeline")


class Timeline:
    """Stage marks of the requests on one rank (`role` names it in the log line)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._marks: dict[str, list[tuple[str, float]]] = {}

    def mark(self, rid: str, stage: str) -> None:
        """Record `stage` now; marking the stage that was marked last moves it (a stage that repeats, such
        as a step beginning while the request waits, keeps its latest time)."""
        if ENABLED:
            marks = self._marks.setdefault(rid, [])
            if marks and marks[-1][0] == stage and len(marks) > 1:
                marks[-1] = (stage, time.time())
            else:
                marks.append((stage, time.time()))

    def finish(self, rid: str, stage: str) -> None:
        """Mark the last stage and log the request's line (warning level: it is asked for explicitly)."""
        if not ENABLED:
            return
        self.mark(rid, stage)
        marks = self._marks.pop(rid)
        if len(marks) < 2:  # arrived before the timeline was on, or never marked: nothing to say
            return
        start = marks[0][1]
        stages = " ".join(f"{name}=+{(at - start) * 1e3:.2f}ms" for name, at in marks[1:])
        log.warning("timeline %s rid=%s t0=%.6f %s", self.role, rid, start, stages)

    def drop(self, rid: str) -> None:
        self._marks.pop(rid, None)
