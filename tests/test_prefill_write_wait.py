"""A prefill rank that just posted rooms' last writes polls their senders, briefly, before its next forward:
a sender tells decode its writes are done only when polled, and without this the next poll came after that
whole forward (178 ms at the median on one shared H100). The senders here are stand-ins that count polls; the
transfer path itself runs in tests/test_pd_*.py."""

from __future__ import annotations

import time

from kvtransfer.state import KVPoll
from prefill_worker import runner
from prefill_worker.runner import PrefillRunner


class CountingSender:
    """Transferring for `pending_polls` polls, then `final`."""

    def __init__(self, pending_polls: int, final: KVPoll = KVPoll.Success) -> None:
        self.left = pending_polls
        self.final = final
        self.polls = 0

    def poll(self) -> KVPoll:
        self.polls += 1
        if self.left > 0:
            self.left -= 1
            return KVPoll.Transferring
        return self.final


def test_senders_are_polled_until_each_has_ended_and_no_longer() -> None:
    quick, slower, failed = CountingSender(0), CountingSender(5), CountingSender(2, KVPoll.Failed)
    PrefillRunner._await_writes([quick, slower, failed])  # type: ignore[list-item]
    assert slower.polls == 6 and failed.polls == 3  # each polled until it ended...
    assert quick.polls == 1  # ...and an ended one is not polled again


def test_a_write_still_in_flight_holds_the_next_forward_back_at_most_write_wait_s() -> None:
    stuck = CountingSender(10**9)
    start = time.monotonic()
    PrefillRunner._await_writes([stuck])  # type: ignore[list-item]
    waited = time.monotonic() - start
    assert runner.WRITE_WAIT_S <= waited < runner.WRITE_WAIT_S + 0.5  # bounded (a loaded machine may add some)
    assert stuck.polls > 1
