"""Where a disaggregated request's time goes on each rank: stage marks per request.

Always on, and cheap (a clock read and a list append per mark): each rank sums the time between chosen
marks over every request that leaves it (`Timeline.counters`, reported with the pool counts, so worker
/metrics has e.g. `tandem_worker_kv_wait_us_total` and `tandem_worker_kv_wait_count`). With
TANDEM_TIMELINE=1 (read at import) each request also logs one line when it leaves the rank, carrying the
wall-clock time of its first mark, so the lines of the prefill and the decode rank of one host line up
(`bench.pd_timeline` joins them):
`timeline decode rid=... t0=1795455679.256129 reserved=+0.31ms landed=+9.80ms first_token_queued=+9.85ms`.
"""

from __future__ import annotations

import logging
import os
import time

ENABLED = os.environ.get("TANDEM_TIMELINE") == "1"
log = logging.getLogger("tandem.timeline")


class Timeline:
    """Stage marks of the requests on one rank.

    role: names the rank's side in the log line ("prefill" | "decode").
    spans: (name, from mark, to mark): the time between those marks is summed over finished requests.
    """

    def __init__(self, role: str, spans: tuple[tuple[str, str, str], ...] = ()) -> None:
        self.role = role
        self.spans = spans
        self._marks: dict[str, list[tuple[str, float]]] = {}
        self._total_us = dict.fromkeys((name for name, _, _ in spans), 0)
        self._count = dict.fromkeys((name for name, _, _ in spans), 0)

    def mark(self, rid: str, stage: str) -> None:
        """Record `stage` now; marking the stage that was marked last moves it (a stage that repeats, such
        as a step beginning while the request waits, keeps its latest time)."""
        marks = self._marks.setdefault(rid, [])
        if marks and marks[-1][0] == stage and len(marks) > 1:
            marks[-1] = (stage, time.time())
        else:
            marks.append((stage, time.time()))

    def finish(self, rid: str, stage: str) -> None:
        """Mark the last stage, add the request's spans to the sums, forget it, and log its line when asked."""
        self.mark(rid, stage)
        marks = self._marks.pop(rid)
        at = dict(marks)
        for name, start, end in self.spans:
            if start in at and end in at:
                self._total_us[name] += round((at[end] - at[start]) * 1e6)
                self._count[name] += 1
        if ENABLED and len(marks) > 1:
            t0 = marks[0][1]
            stages = " ".join(f"{name}=+{(t - t0) * 1e3:.2f}ms" for name, t in marks[1:])
            log.warning("timeline %s rid=%s t0=%.6f %s", self.role, rid, t0, stages)

    def drop(self, rid: str) -> None:
        """Forget a request that ended without its last stage (failed, aborted)."""
        self._marks.pop(rid, None)

    @property
    def live(self) -> int:
        """Requests with marks and no end yet (0 when the rank is idle)."""
        return len(self._marks)

    def counters(self) -> dict[str, int]:
        """`<span>_us_total` and `<span>_count` for every span: monotonic, summed over DP groups upstream."""
        out: dict[str, int] = {}
        for name, _, _ in self.spans:
            out[f"{name}_us_total"] = self._total_us[name]
            out[f"{name}_count"] = self._count[name]
        return out
