"""Where a bench's report goes: JSON under bench/results (or ``--out``) and its PNG beside it, one writer for
every bench that produces a report and a plot."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_report(report: dict[str, Any], name: str, device: str, out: str | None,
                 plot: Callable[[dict[str, Any], Path], None] | None = None, replot_hint: str = "") -> Path:
    """The report as JSON (``out``, else bench/results/<name>_<gpu|cpu>.json) and, given ``plot``, its PNG
    beside it. A GPU image without matplotlib gets the JSON alone, and a line saying so."""
    kind = "gpu" if device.startswith("cuda") else "cpu"
    path = Path(out or RESULTS / f"{name}_{kind}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if plot is not None:
        try:
            plot(report, path.with_suffix(".png"))
        except ImportError:
            print(f"matplotlib missing: no PNG{replot_hint}")
    print(f"wrote {path}")
    return path
