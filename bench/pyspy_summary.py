"""Summarise a py-spy raw profile (``py-spy record --format raw --subprocesses``): per process, the functions
that hold the most samples (inclusive), so where a loop spends its time between forwards reads as a table.

    python -m bench.pyspy_summary PROFILE.txt [--top 30] [--match decode_worker] [--under run_rank]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def parse(path: Path, under: str = "") -> dict[str, tuple[int, Counter[str]]]:
    """process label -> (samples, inclusive samples per ``function (file)``); with ``under``, only the
    samples whose stack holds a frame of that function (e.g. a loop, leaving start-up out)."""
    totals: dict[str, int] = defaultdict(int)
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        # With --subprocesses a child's stack starts with its ancestors' "process PID:cmd" frames: the
        # sample belongs to the last of them.
        last = max(i for i, f in enumerate(frames) if f.startswith("process ")) if frames[0].startswith(
            "process ") else 0
        process = frames[last][:160]
        if under and not any(f.startswith(under + " ") for f in frames[last + 1:]):
            continue
        totals[process] += int(count)
        seen = set()
        for frame in frames[last + 1:]:
            m = FRAME.match(frame)
            key = f"{m['func']} ({m['file']})" if m else frame
            if key not in seen:  # a recursive frame counts once per sample
                seen.add(key)
                inclusive[process][key] += int(count)
    return {p: (totals[p], inclusive[p]) for p in totals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pyspy_summary", description=__doc__.split("\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", default="", help="only processes whose command line contains this")
    parser.add_argument("--under", default="", help="only samples inside this function (e.g. run_rank)")
    args = parser.parse_args(argv)
    processes = parse(args.profile, args.under)
    for process, (total, inclusive) in sorted(processes.items(), key=lambda kv: -kv[1][0]):
        if args.match not in process or total < 10:
            continue
        print(f"\n{process}: {total} samples")
        for func, n in inclusive.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {func}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
