"""Summary statistics of a serving benchmark run: latency percentiles, throughput, goodput.

Goodput (DistServe, vLLM ``--goodput``) counts completed requests that met every SLO given: TTFT
within ``slo_ttft_ms`` and TPOT (the request's mean inter-token latency) within ``slo_itl_ms``.
The ITL SLO is judged on the per-request mean rather than the worst gap because one scheduler hiccup
would otherwise fail a long request that users perceive as smooth; the ITL percentiles report the tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.serving_client import RequestResult

PERCENTILES: tuple[int, ...] = (50, 90, 99)


@dataclass(frozen=True)
class SloTargets:
    """Optional per-request latency targets in milliseconds (None means no target)."""

    ttft_ms: float | None = None
    itl_ms: float | None = None

    def met_by(self, result: RequestResult) -> bool:
        if not result.success:
            return False
        if self.ttft_ms is not None and result.ttft_s * 1e3 > self.ttft_ms:
            return False
        tpot = result.tpot_s
        return not (self.itl_ms is not None and tpot is not None and tpot * 1e3 > self.itl_ms)


def latency_stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean, p50 (median), p90, p99, std and max of ``values_s`` converted to milliseconds."""
    if not values_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "std": None, "max": None}
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    stats: dict[str, float | None] = {"mean": float(ms.mean())}
    for p in PERCENTILES:
        stats[f"p{p}"] = float(np.percentile(ms, p))
    stats["std"] = float(ms.std())
    stats["max"] = float(ms.max())
    return stats


def summarize(results: list[RequestResult], duration_s: float, slo: SloTargets) -> dict[str, Any]:
    """Aggregate numbers for a run that took ``duration_s`` seconds of wall time."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    done = [r for r in results if r.success]
    failed = [r for r in results if r.sent and not r.success and not r.cancelled]
    cancelled = [r for r in results if r.cancelled]
    input_tokens = sum(r.input_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    good = [r for r in done if slo.met_by(r)]
    itls = [gap for r in done for gap in r.itl_s]
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(failed),
        "cancelled": len(cancelled),
        "not_sent": sum(1 for r in results if not r.sent),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "input_throughput": input_tokens / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "goodput": len(good) / duration_s if (slo.ttft_ms is not None or slo.itl_ms is not None) else None,
        "slo_attainment": len(good) / len(results) if results else 0.0,
        "slo_ttft_ms": slo.ttft_ms,
        "slo_itl_ms": slo.itl_ms,
        "ttft_ms": latency_stats_ms([r.ttft_s for r in done]),
        "tpot_ms": latency_stats_ms(tpots),
        "itl_ms": latency_stats_ms(itls),
        "e2e_ms": latency_stats_ms([r.e2e_s for r in done]),
        "errors": errors,
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary(summary: dict[str, Any], label: str = "") -> str:
    """A fixed-width table in the style of SGLang's ``bench_serving`` printout."""
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]
    if label:
        lines.append(f"{'Label:':<42}{label}")
    rows: list[tuple[str, str]] = [
        ("Successful requests:", str(summary["completed"])),
        ("Failed requests:", str(summary["failed"])),
        ("Cancelled (time limit) / not sent:", f"{summary['cancelled']} / {summary['not_sent']}"),
        ("Benchmark duration (s):", _fmt(summary["duration_s"])),
        ("Total input tokens:", str(summary["total_input_tokens"])),
        ("Total generated tokens:", str(summary["total_output_tokens"])),
        ("Request throughput (req/s):", _fmt(summary["request_throughput"])),
        ("Input token throughput (tok/s):", _fmt(summary["input_throughput"])),
        ("Output token throughput (tok/s):", _fmt(summary["output_throughput"])),
        ("Total token throughput (tok/s):", _fmt(summary["total_token_throughput"])),
    ]
    if summary["goodput"] is not None:
        rows.append(("Goodput (req/s):", _fmt(summary["goodput"])))
        rows.append(("SLO attainment (%):", _fmt(100 * summary["slo_attainment"])))
    lines.extend(f"{name:<42}{value}" for name, value in rows)
    titles = {"ttft_ms": "Time to First Token", "tpot_ms": "Time per Output Token (excl. 1st token)",
              "itl_ms": "Inter-token Latency", "e2e_ms": "End-to-End Latency"}
    for key, title in titles.items():
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        short = key.split("_")[0].upper()
        for stat in ("mean", "p50", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {short} (ms):':<42}{_fmt(summary[key][stat])}")
    for message, count in sorted(summary["errors"].items(), key=lambda item: -item[1])[:5]:
        lines.append(f"error x{count}: {message[:100]}")
    lines.append("=" * 60)
    return "\n".join(lines)
