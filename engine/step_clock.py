"""Where a rank's loop turns go: the wall time of each phase of the turns that ran a decode forward.

Always on and cheap (one clock read per phase boundary, a few per turn). The rank loop opens a turn
(`begin`), each part of the turn ends its phase with `lap(phase)` (the time since the previous lap goes to
that phase), and the loop closes the turn (`end`). Only turns whose scheduler ran a DECODE forward are summed:
a prefill chunk's forward would hide the decode host work. Reported with the pool counts (`counters`), so
worker /metrics has `tandem_worker_decode_steps`, `..._decode_turn_us_total` and one
`..._decode_<phase>_us_total` per phase; host work per decode step is turn minus forward.

On CUDA the forward call only launches work (a graph replay returns at once) and the wait for it shows up in
`sample`, whose first device-to-host copy synchronises. So the forward's device time is also timed with two
CUDA events, read back at the end of the turn (after that copy: no sync is added), as
`decode_forward_device_us_total`: turn minus device forward is then the time the GPU had nothing to run.
An overlapped decode (`engine.decode_overlap`) ends its turn while its forward runs: each forward's pair of
events is read at the end of a later turn, once the forward is done.
"""

from __future__ import annotations

import time
from collections import deque

import torch

# In loop order: routing new requests and handing them to the runner; polling KV transfers (decode) and
# adopting arrived requests; the scheduler's admission and page growth; laying out the forward's inputs;
# the forward call; sampling and appending tokens (finish checks); building and sending outputs; the
# rest of the turn (status reports, load all-gather).
PHASES = ("inbox", "transfers", "schedule", "build", "forward", "sample", "outputs", "loop")


class StepClock:
    """Phase times of decode turns on one rank. `device`: events time the forward on the device (CUDA only)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.steps = 0
        self._totals = dict.fromkeys(PHASES, 0.0)
        self._turn = dict.fromkeys(PHASES, 0.0)
        self._turn_total = 0.0
        self._device_total = 0.0
        self._start = self._last = time.perf_counter()
        self._decoded = False
        self._timed = device is not None and device.type == "cuda"
        self._in_flight: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()  # forwards not yet read
        self._spare: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def begin(self) -> None:
        """A loop turn starts: phase times so far are dropped (time between turns counts nowhere)."""
        self._start = self._last = time.perf_counter()
        for phase in PHASES:
            self._turn[phase] = 0.0
        self._decoded = False

    def lap(self, phase: str) -> None:
        """The time since the previous lap (or `begin`) went to `phase`."""
        now = time.perf_counter()
        self._turn[phase] += now - self._last
        self._last = now

    def forward_begins(self) -> None:
        """Right before a DECODE forward: what came since the last lap was laying out its inputs."""
        self.lap("build")
        if self._timed:
            if not self._spare:
                self._spare.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            pair = self._spare.pop()
            pair[0].record()
            self._in_flight.append(pair)

    def forward_ends(self) -> None:
        """Right after the DECODE forward call returned (on CUDA: its work is launched, maybe not done)."""
        if self._in_flight:
            self._in_flight[-1][1].record()
        self.lap("forward")
        self._decoded = True

    def end(self) -> None:
        """The turn is over: sum it if it ran a decode forward."""
        self.lap("loop")
        if not self._decoded:
            return
        self.steps += 1
        for phase in PHASES:
            self._totals[phase] += self._turn[phase]
        self._turn_total += self._last - self._start
        while self._in_flight and self._in_flight[0][1].query():  # done: its tokens were read back, or will be
            start, stop = pair = self._in_flight.popleft()
            self._device_total += start.elapsed_time(stop) / 1e3
            self._spare.append(pair)

    def counters(self) -> dict[str, int]:
        """Monotonic microsecond sums and the step count (summed over DP groups upstream)."""
        out = {"decode_steps": self.steps, "decode_turn_us_total": round(self._turn_total * 1e6)}
        for phase in PHASES:
            out[f"decode_{phase}_us_total"] = round(self._totals[phase] * 1e6)
        if self._timed:
            out["decode_forward_device_us_total"] = round(self._device_total * 1e6)
        return out
