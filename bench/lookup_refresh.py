"""How long a decode loop's bootstrap lookup blocks it: the client before stale-while-revalidate vs after.

A loop stands in for a decode rank's: every `--step-ms` it looks the prefill instance up once (as `_reserve`
does for each request it admits) and records how long `lookup` held it. The prefill instance is a real
`BootstrapService` with its ranks registered, behind a front that holds each answer back `--delays-ms` (a
slow prefill host: 0 is the service on this machine). The client keeps its own `CACHE_TTL_S` (1 s), so a run
of `--duration` seconds crosses that many refreshes. "before" is `BootstrapClient` as it was at
`--before-rev` (default: the parent of the commit that added `kvtransfer/bootstrap_client.py`), loaded from
git; "after" is this tree's.

    python -m bench.lookup_refresh                            # 0, 5, 50 ms hosts, 10 s each, ~70 s
    python -m bench.lookup_refresh --duration 3 --delays-ms 20
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script too

from bench.slow_bootstrap import SlowBootstrapFront  # noqa: E402
from kvtransfer.bootstrap import BootstrapService  # noqa: E402
from kvtransfer.bootstrap_client import BootstrapClient  # noqa: E402
from kvtransfer.layout import AuxLayout, PageLayout  # noqa: E402
from kvtransfer.mapping import ParallelLayout  # noqa: E402
from kvtransfer.messages import RankRegistration  # noqa: E402


def _registration(rank: int) -> RankRegistration:
    """A registration of a made-up two-rank prefill instance: what the lookups fetch (no transfer happens)."""
    return RankRegistration(
        rank=rank, tp_size=2, dp_size=1, session=f"s{rank}", control_endpoint=f"tcp://127.0.0.1:{7000 + rank}",
        engine_kind="nixl", engine_name=f"p{rank}", engine_metadata=b"meta",
        page_layout=PageLayout(num_pages=8, num_layers=3, page_size=4, token_dim=16, itemsize=2, dtype="bfloat16",
                               base_ptr=4096),
        aux_layout=AuxLayout(base_ptr=8192, slot_bytes=16, num_slots=4))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _client_at(rev: str) -> type:
    """`BootstrapClient` as `kvtransfer/bootstrap.py` defined it at `rev` (before the client had a module)."""
    module = types.ModuleType("bootstrap_before")
    module.__file__ = f"{rev}:kvtransfer/bootstrap.py"
    exec(compile(_git("show", f"{rev}:kvtransfer/bootstrap.py"), module.__file__, "exec"), module.__dict__)
    return module.BootstrapClient


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_cell(client_class: type, delay_s: float, duration_s: float, step_s: float) -> dict[str, Any]:
    service = BootstrapService(ParallelLayout(2))
    front = SlowBootstrapFront(service.address, delay_s)
    client = client_class(timeout_s=5.0)
    try:
        for rank in (0, 1):
            client.register(service.address, _registration(rank))
        client.lookup(front.host, front.port)  # the first lookup blocks either way: not the loop's steady state
        blocked: list[float] = []
        started = time.perf_counter()
        next_step = started
        while next_step - started < duration_s:
            before = time.perf_counter()
            client.lookup(front.host, front.port)
            blocked.append(time.perf_counter() - before)
            next_step += step_s
            time.sleep(max(0.0, next_step - time.perf_counter()))
        return {
            "lookups": len(blocked),
            "refresh_gets": front.requests - 1,
            "max_ms": max(blocked) * 1e3,
            "p99_ms": _percentile(blocked, 0.99) * 1e3,
            "p999_ms": _percentile(blocked, 0.999) * 1e3,
            "p50_ms": _percentile(blocked, 0.5) * 1e3,
            "over_1ms": sum(b > 1e-3 for b in blocked),
        }
    finally:
        if hasattr(client, "close"):
            client.close()
        front.close()
        service.close()


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    delays = sorted({c["delay_ms"] for c in cells})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "max_ms", "longest lookup (ms)"), (axes[1], "p999_ms", "p99.9 lookup (ms)")):
        width = 0.38
        for i, label in enumerate(("before", "after")):
            values = [next(c[key] for c in cells if c["client"] == label and c["delay_ms"] == d) for d in delays]
            bars = ax.bar([x + (i - 0.5) * width for x in range(len(delays))], values, width, label=label)
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(delays)), [f"host answers +{d:g} ms" for d in delays])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"BootstrapClient.lookup in a {results['step_ms']:g} ms loop, {results['duration_s']:g} s per "
                 f"cell, CACHE_TTL_S {results['cache_ttl_s']:g} s (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--step-ms", type=float, default=5.0, help="the loop's period (one lookup per step)")
    parser.add_argument("--delays-ms", type=float, nargs="+", default=[0.0, 5.0, 50.0],
                        help="how long the prefill host holds each answer back")
    parser.add_argument("--before-rev", default=None, help="the tree whose client is 'before'")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lookup_refresh_cpu"),
                        help="path of the results, without .json / .png")
    args = parser.parse_args()
    before_rev = args.before_rev or _git("log", "-1", "--format=%H", "--diff-filter=A", "--",
                                         "kvtransfer/bootstrap_client.py") + "~1"
    before_rev = _git("rev-parse", "--short", before_rev)
    clients = {"before": _client_at(before_rev), "after": BootstrapClient}
    cells = []
    for delay_ms in args.delays_ms:
        for label, client_class in clients.items():
            cell = run_cell(client_class, delay_ms / 1e3, args.duration, args.step_ms / 1e3)
            cells.append({"client": label, "delay_ms": delay_ms, **cell})
            print(f"{label:6} host +{delay_ms:5g} ms: {cell['lookups']} lookups, {cell['refresh_gets']} GETs, "
                  f"max {cell['max_ms']:.3f} ms, p99.9 {cell['p999_ms']:.3f} ms, p99 {cell['p99_ms']:.3f} ms, "
                  f"p50 {cell['p50_ms']:.4f} ms, {cell['over_1ms']} over 1 ms", flush=True)
    results = {
        "bench": "lookup_refresh",
        "before_rev": before_rev,
        "after_rev": _git("rev-parse", "--short", "HEAD") + (" (dirty)" if _git("status", "--porcelain") else ""),
        "duration_s": args.duration,
        "step_ms": args.step_ms,
        "cache_ttl_s": BootstrapClient.CACHE_TTL_S,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cells": cells,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
