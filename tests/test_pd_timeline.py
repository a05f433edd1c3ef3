"""Request timelines: the rank-side marks (`engine.runtime.timeline`) and the joiner (`bench.pd_timeline`)."""

from __future__ import annotations

import json
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


def test_prefill_busy_is_the_union_of_the_forwards_against_their_span(tmp_path: Path) -> None:
    # a and b share one forward (100.000-100.010 s), c runs alone after a gap (100.020-100.030 s)
    (tmp_path / "prefill.log").write_text(
        "x timeline prefill rid=a t0=100.000000 step_began=+0.00ms forward_done=+10.00ms\n"
        "x timeline prefill rid=b t0=99.995000 step_began=+5.00ms forward_done=+15.00ms\n"
        "x timeline prefill rid=c t0=100.010000 step_began=+10.00ms forward_done=+20.00ms\n"
        "x timeline prefill rid=d t0=100.010000 forward_done=+20.00ms\n"  # no start mark: not counted
    )
    busy = pd_timeline.prefill_busy(pd_timeline.parse(tmp_path))
    assert busy is not None
    assert busy["busy_s"] == pytest.approx(0.020) and busy["span_s"] == pytest.approx(0.030)
    assert busy["share"] == pytest.approx(2 / 3)
    assert pd_timeline.prefill_busy({}) is None
    later = pd_timeline.prefill_busy(pd_timeline.parse(tmp_path), since=100.005)  # c alone
    assert later is not None and later["busy_s"] == pytest.approx(0.010) and later["share"] == pytest.approx(1.0)
    # from the command line, the benchmark's start read from compare_pd's JSON for the setup the logs are of
    logs = tmp_path / "1p1d"
    logs.mkdir()
    (tmp_path / "prefill.log").rename(logs / "prefill.log")
    (logs / "decode.log").write_text("y timeline decode rid=c t0=100.010000 landed=+21.00ms\n")
    bench = tmp_path / "compare_pd.json"
    bench.write_text(json.dumps({"runs": {"1p1d": {"started_at": 100.005}}}))
    out = tmp_path / "timeline.json"
    assert pd_timeline.main([str(logs), "--bench-json", str(bench), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["prefill_busy"]["busy_s"] == pytest.approx(0.010)
