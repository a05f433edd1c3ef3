"""Request timelines: the rank-side marks (`engine.runtime.timeline`) and the joiner (`bench.pd_timeline`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bench import pd_timeline
from engine.runtime import timeline as timeline_mod


def test_spans_are_summed_always_and_lines_logged_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(timeline_mod, "ENABLED", False)
    clock = iter([10.0, 10.002, 10.0025, 20.0, 20.001])
    monkeypatch.setattr(timeline_mod.time, "time", lambda: next(clock))
    tl = timeline_mod.Timeline("decode", (("kv_wait", "reserved", "landed"), ("never", "reserved", "nowhere")))
    with caplog.at_level(logging.WARNING, logger="tandem.timeline"):
        tl.mark("r1", "reserved")
        tl.mark("r1", "landed")
        tl.finish("r1", "first_token_queued")
        tl.mark("r2", "reserved")
        tl.drop("r2")  # failed: nothing summed
    assert not caplog.records and tl.live == 0
    assert tl.counters() == {"kv_wait_us_total": 2000, "kv_wait_count": 1, "never_us_total": 0, "never_count": 0}


def test_a_finished_request_logs_its_stages_once_and_is_forgotten(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(timeline_mod, "ENABLED", True)
    tl = timeline_mod.Timeline("prefill")
    with caplog.at_level(logging.WARNING, logger="tandem.timeline"):
        tl.mark("r1", "arrived")
        tl.mark("r1", "forward_done")
        tl.finish("r1", "kv_done")
        tl.mark("r2", "arrived")
        tl.drop("r2")
        tl.finish("r3", "kv_done")  # never marked before: nothing to say
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("timeline prefill rid=r1 t0=")
    assert "forward_done=+" in lines[0] and "kv_done=+" in lines[0]
    assert not tl._marks


def test_joiner_pairs_both_roles_on_the_prefill_clock(tmp_path: Path) -> None:
    (tmp_path / "prefill.log").write_text(
        "x timeline prefill rid=a t0=100.000000 forward_done=+10.00ms kv_posted=+10.50ms kv_done=+11.00ms\n"
        "x timeline prefill rid=b t0=200.000000 forward_done=+20.00ms kv_posted=+20.50ms kv_done=+21.00ms\n"
        "x timeline prefill rid=lonely t0=300.000000 forward_done=+1.00ms kv_posted=+2.00ms kv_done=+3.00ms\n"
    )
    (tmp_path / "decode.log").write_text(
        "y timeline decode rid=a t0=100.001000 reserved=+0.50ms landed=+11.00ms first_token_queued=+11.50ms\n"
        "y timeline decode rid=b t0=200.001000 reserved=+0.50ms landed=+23.00ms first_token_queued=+23.50ms\n"
        "unrelated line\n"
    )
    result = pd_timeline.stage_medians(pd_timeline.parse(tmp_path))
    assert result["requests"] == 2
    med = result["median_ms"]
    assert med["decode arrived"] == pytest.approx(1.0)
    assert med["prefill forward done"] == pytest.approx(15.0)
    assert med["decode saw KV landed"] == pytest.approx(1.0 + (11.0 + 23.0) / 2)
    assert pd_timeline.main([str(tmp_path / "nothing-here")]) == 1
