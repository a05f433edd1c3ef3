"""Where 1P1D time to first token goes: joins the prefill and decode ranks' timeline lines.

    TANDEM_TIMELINE=1 python -m bench.compare_pd --max-concurrency 1 --log-dir runs/compare_pd
    python -m bench.pd_timeline runs/compare_pd/1p1d [--json OUT]

Workers started with TANDEM_TIMELINE=1 log one line per request and rank when it leaves the rank
(`engine.runtime.timeline`). This pairs the prefill and decode lines of each request (same host: their
wall clocks agree) and prints the median of each stage, in ms from the prefill rank's arrival.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", type=Path, help="the 1P1D servers' logs (searched recursively)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = stage_medians(parse(args.log_dir))
    if not result["requests"]:
        print(f"no paired timeline lines under {args.log_dir} (workers need TANDEM_TIMELINE=1)", file=sys.stderr)
        return 1
    print(f"{result['requests']} requests; median ms after the prefill rank got the request:")
    for name, value in result["median_ms"].items():
        print(f"  {name:<26}{value:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
