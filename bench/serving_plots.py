"""PNG figure of one or more serving runs: latency CDFs (TTFT, TPOT, ITL, E2E), ITL over time and
requests in flight over time.

Takes the JSON dicts ``run_benchmark`` returns, so ``compare_pd`` can overlay several runs in one
figure. matplotlib is imported here only, and with the Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def itl_timeline(requests: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(time since benchmark start in s, ITL in ms) of every token after a request's first."""
    times: list[np.ndarray] = []
    gaps: list[np.ndarray] = []
    for req in requests:
        if not req["success"] or not req["itl_ms"]:
            continue
        itl_ms = np.asarray(req["itl_ms"], dtype=np.float64)
        first_token_s = req["start_s"] + req["ttft_ms"] / 1e3
        times.append(first_token_s + np.cumsum(itl_ms) / 1e3)
        gaps.append(itl_ms)
    if not times:
        return np.empty(0), np.empty(0)
    return np.concatenate(times), np.concatenate(gaps)


def in_flight_timeline(requests: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(event time in s, successful requests in flight just after it), for a step plot."""
    events = sorted([(r["start_s"], 1) for r in requests if r["success"]]
                    + [(r["start_s"] + r["e2e_ms"] / 1e3, -1) for r in requests if r["success"]])
    if not events:
        return np.empty(0), np.empty(0)
    times = np.array([t for t, _ in events])
    return times, np.cumsum([d for _, d in events])


def _cdf(ax: Any, values: list[float], name: str) -> None:
    if not values:
        return
    xs = np.sort(np.asarray(values, dtype=np.float64))
    ys = np.arange(1, xs.size + 1) / xs.size
    ax.step(xs, ys, where="post", label=name)


def write_plot(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Draw every run of ``runs`` into one 2x3 figure at ``path`` and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
              ("e2e_ms", "E2E latency (ms)")]
    for ax, (key, title) in zip(axes.flat[:4], panels, strict=True):
        for run in runs:
            done = [r for r in run["requests"] if r["success"]]
            if key == "itl_ms":
                values = [gap for r in done for gap in r["itl_ms"]]
            else:
                values = [r[key] for r in done if r[key] is not None]
            _cdf(ax, values, run.get("label") or run["config"]["backend"])
        ax.set_title(f"CDF of {title}")
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    timeline = axes.flat[4]
    for run in runs:
        times, gaps = itl_timeline(run["requests"])
        timeline.scatter(times, gaps, s=2, alpha=0.5, label=run.get("label") or run["config"]["backend"])
    timeline.set_title("ITL over time")
    timeline.set_xlabel("time since start (s)")
    timeline.set_ylabel("ITL (ms)")
    timeline.grid(alpha=0.3)
    in_flight = axes.flat[5]
    for run in runs:
        times, counts = in_flight_timeline(run["requests"])
        in_flight.step(times, counts, where="post", label=run.get("label") or run["config"]["backend"])
    in_flight.set_title("Requests in flight (completed ones)")
    in_flight.set_xlabel("time since start (s)")
    in_flight.set_ylabel("requests")
    in_flight.grid(alpha=0.3)
    for ax in axes.flat:
        if len(runs) > 1:
            ax.legend(fontsize=7)
    config = runs[0]["config"]
    fig.suptitle(
        f"{config['backend']} in={config['random_input_len']} out={config['random_output_len']} "
        f"n={config['num_prompts']} rate={config['request_rate']} conc={config['max_concurrency']}"
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
