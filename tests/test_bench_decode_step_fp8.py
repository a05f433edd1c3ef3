"""bench.decode_step_fp8 on the CPU: both runs, the ratio per batch size, the JSON and PNG, and the refusal of
the one flag it sets itself. (On CPU FP8 weights are dequantized at load: the numbers are not a measurement.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import decode_step_fp8
from engine.tiny_model import write_tiny_model


def test_the_bench_reports_fp8_over_bf16_per_batch_size_with_both_reports(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "tiny"
    write_tiny_model(model, variant="v3")
    out = tmp_path / "out" / "fp8_vs_bf16.json"
    assert decode_step_fp8.main(["--device", "cpu", "--model-config", str(model), "--batch-sizes", "1,4",
                                 "--context", "48", "--iters", "2", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    for r in report["results"]:
        assert r["fp8_over_bf16"] == pytest.approx(r["fp8_ms"] / r["bf16_ms"])
        assert report["headline"][str(r["batch_size"])] == r["fp8_over_bf16"]
    assert report["reports"]["bf16"]["weights"] != "fp8" and not report["fp8_weights_kept"]  # CPU: dequantized
    assert out.with_suffix(".png").stat().st_size > 0
    assert "fp8/bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        decode_step_fp8.main(["--device", "cpu", "--quantization", "fp8"])
