"""Where 1P1D time to first token goes: joins the prefill and decode ranks' timeline lines.

    TANDEM_TIMELINE=1 python -m bench.compare_pd --max-concurrency 1 --log-dir runs/compare_pd
    python -m bench.pd_timeline runs/compare_pd/1p1d [--json OUT] [--bench-json compare_pd.json]

Workers started with TANDEM_TIMELINE=1 log one line per request and rank when it leaves the rank
(`engine.runtime.timeline`). This pairs the prefill and decode lines of each request (same host: their
wall clocks agree) and prints the median of each stage, in ms from the prefill rank's arrival, and how much of
the run the prefill rank spent in forwards (near all of it: output was bound by prefill).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

LINE = re.compile(r"timeline (?P<role>\w+) rid=(?P<rid>\S+) t0=(?P<t0>[\d.]+) (?P<marks>.*)")
# (column, role, mark): the decode side's marks are shifted onto the prefill rank's clock
STAGES = (
    ("decode arrived", "decode", None),
    ("decode reserved pages", "decode", "reserved"),
    ("prefill step began", "prefill", "step_began"),
    ("prefill forward done", "prefill", "forward_done"),
    ("prefill KV + aux posted", "prefill", "kv_posted"),
    ("prefill saw writes done", "prefill", "kv_done"),
    ("decode saw KV landed", "decode", "landed"),
    ("decode first token out", "decode", "first_token_queued"),
)


def parse(log_dir: Path) -> dict[str, dict[str, tuple[float, dict[str, float]]]]:
    """rid -> role -> (t0 seconds, {mark: ms after t0})."""
    rows: dict[str, dict[str, tuple[float, dict[str, float]]]] = {}
    for path in sorted(log_dir.rglob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            m = LINE.search(line)
            if m is None:
                continue
            marks = {}
            for item in m["marks"].split():
                name, _, value = item.partition("=")
                marks[name] = float(value.removeprefix("+").removesuffix("ms"))
            rows.setdefault(m["rid"], {})[m["role"]] = (float(m["t0"]), marks)
    return rows


def stage_medians(rows: dict[str, dict[str, tuple[float, dict[str, float]]]]) -> dict[str, Any]:
    per_stage: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    paired = 0
    for roles in rows.values():
        if "prefill" not in roles or "decode" not in roles:
            continue
        paired += 1
        p_t0 = roles["prefill"][0]
        for name, role, mark in STAGES:
            t0, marks = roles[role]
            offset = (t0 - p_t0) * 1e3
            if mark is None:
                per_stage[name].append(offset)
            elif mark in marks:
                per_stage[name].append(offset + marks[mark])
    return {"requests": paired, "median_ms": {k: statistics.median(v) for k, v in per_stage.items() if v}}


def prefill_busy(rows: dict[str, dict[str, tuple[float, dict[str, float]]]],
                 since: float = 0.0) -> dict[str, float] | None:
    """How much of the run the prefill rank spent in forwards: the union of every request's (step began,
    forward done) interval (requests of one forward share theirs) against the span from the first start to the
    last end, over the requests that reached the prefill rank at ``since`` (epoch seconds) or later (a
    benchmark's start: its warm-up request compiles kernels). A share near 1 means output was bound by
    prefill (a one-GPU 1P1D at high concurrency)."""
    spans = sorted((t0 + marks["step_began"] / 1e3, t0 + marks["forward_done"] / 1e3)
                   for t0, marks in (roles["prefill"] for roles in rows.values() if "prefill" in roles)
                   if "step_began" in marks and "forward_done" in marks and t0 >= since)
    if not spans:
        return None
    busy, (start, end) = 0.0, spans[0]
    for began, done in spans[1:]:
        if began > end:  # a gap: close the merged interval
            busy, start = busy + end - start, began
        end = max(end, done)
    busy += end - start
    span = end - spans[0][0]  # `end` closes the last merged interval: the latest forward's end
    return {"busy_s": busy, "span_s": span, "share": busy / span if span > 0 else 1.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", type=Path, help="the 1P1D servers' logs (searched recursively)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--bench-json", type=Path, default=None,
                        help="bench.compare_pd's JSON of the same run: the prefill busy share then counts the "
                             "requests from the benchmark's start on (its warm-up request compiles kernels)")
    args = parser.parse_args(argv)
    rows = parse(args.log_dir)
    result = stage_medians(rows)
    since = 0.0
    if args.bench_json is not None:  # the setup's run: the log dir is named after it (compare_pd's layout)
        since = json.loads(args.bench_json.read_text())["runs"][args.log_dir.name]["started_at"]
    result["prefill_busy"] = prefill_busy(rows, since)
    if not result["requests"]:
        print(f"no paired timeline lines under {args.log_dir} (workers need TANDEM_TIMELINE=1)", file=sys.stderr)
        return 1
    print(f"{result['requests']} requests; median ms after the prefill rank got the request:")
    for name, value in result["median_ms"].items():
        print(f"  {name:<26}{value:>9.2f}")
    if result["prefill_busy"] is not None:
        busy = result["prefill_busy"]
        print(f"prefill forwards ran {busy['busy_s']:.2f} of the {busy['span_s']:.2f} s from the first to the last "
              f"({100 * busy['share']:.0f} %)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
