"""StepClock: the phases of a decode turn sum to the turn, and only turns that ran a decode forward count."""

from __future__ import annotations

import time

import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.step_clock import PHASES, StepClock
from tests.tiny_engine import tiny_v3_dir


def test_phases_of_a_decoded_turn_add_up_to_the_turn() -> None:
    clock = StepClock()
    clock.begin()
    time.sleep(0.002)
    clock.lap("inbox")
    clock.forward_begins()
    time.sleep(0.003)
    clock.forward_ends()
    clock.end()
    counts = clock.counters()
    assert counts["decode_steps"] == 1
    assert counts["decode_inbox_us_total"] >= 2000 and counts["decode_forward_us_total"] >= 3000
    phases = sum(counts[f"decode_{p}_us_total"] for p in PHASES)
    assert abs(phases - counts["decode_turn_us_total"]) <= len(PHASES)  # rounding only


def test_a_turn_without_a_decode_forward_is_not_counted() -> None:
    clock = StepClock()
    clock.begin()
    clock.lap("inbox")
    time.sleep(0.002)
    clock.end()
    assert clock.counters()["decode_steps"] == 0
    assert clock.counters()["decode_turn_us_total"] == 0


def test_the_scheduler_laps_build_forward_and_sample_of_decode_steps_only(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    llm = LLM(str(tiny_v3_dir(tmp_path_factory)), page_size=16, num_pages=16)
    scheduler = llm.scheduler
    scheduler.add([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=3))
    turns = 0
    while scheduler.has_work():
        scheduler.clock.begin()
        scheduler.step()
        scheduler.clock.end()
        turns += 1
    counts = scheduler.clock.counters()
    llm.close()
    assert turns == 3 and counts["decode_steps"] == 2  # the first turn was the prefill
    for phase in ("schedule", "build", "forward", "sample"):
        assert counts[f"decode_{phase}_us_total"] > 0
