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


def test_the_gemm_floor_split_counts_only_the_kernels_that_stream_fp8_weights() -> None:
    # A 3 ms FP8 step whose FP8 GEMMs take 1.6 ms for 0.75 GB at 3000 GB/s (0.25 ms): 1.65 ms, over a 3.3 ms bf16
    # step 0.5x; the MLA and norm kernels (and a bf16 cuBLAS GEMM) stay in the rest.
    profile = [{"kernel": "_fp8_moe_gemm_kernel", "us_per_step": 1200.0},
               {"kernel": "_fp8_gemm_kernel", "us_per_step": 300.0},
               {"kernel": "_reduce_splits_kernel", "us_per_step": 100.0},
               {"kernel": "_mla_decode_split_kernel", "us_per_step": 200.0},
               {"kernel": "nvjet_sm90_tst_512x8_64x3_2x1_v_bz_TNT", "us_per_step": 150.0}]
    fp8 = {"graph": {"ms": 3.0}, "graph_profile": profile, "step_bytes": {"fp8_weights": 750_000_000}}
    split = decode_step_fp8.at_gemm_floor({"graph": {"ms": 3.3}}, fp8, 3000.0)
    assert split["fp8_gemm_ms"] == pytest.approx(1.6)
    assert split["fp8_gemm_floor_ms"] == pytest.approx(0.25)
    assert split["fp8_rest_ms"] == pytest.approx(1.4)
    assert split["fp8_over_bf16_at_gemm_floor"] == pytest.approx(1.65 / 3.3)
    assert decode_step_fp8.at_gemm_floor({"graph": {"ms": 3.3}}, {**fp8, "graph_profile": None}, 3000.0) == {}
    # The expert GEMMs in one launch (kernels.triton_moe_fused_decode) count as well.
    one_launch = [{**k, "kernel": "_moe_fused_decode_kernel"} if k["kernel"] == "_fp8_moe_gemm_kernel" else k
                  for k in profile]
    split = decode_step_fp8.at_gemm_floor({"graph": {"ms": 3.3}}, {**fp8, "graph_profile": one_launch}, 3000.0)
    assert split["fp8_gemm_ms"] == pytest.approx(1.6)
    # A step timed under PDL: the profile of graphs without it is the one read (its kernels' times hold no wait
    # for the kernel ahead; the PDL profile's GEMMs here are inflated by 0.9 ms of it).
    under_pdl = [{**k, "us_per_step": k["us_per_step"] + 300.0} for k in profile]
    split = decode_step_fp8.at_gemm_floor({"graph": {"ms": 3.3}},
                                          {**fp8, "graph_profile": under_pdl, "graph_profile_serial": profile}, 3000.0)
    assert split["fp8_gemm_ms"] == pytest.approx(1.6) and split["fp8_rest_ms"] == pytest.approx(1.4)


def test_overlay_plots_several_runs_on_one_axis_and_refuses_a_half_given_overlay(tmp_path: Path) -> None:
    def run(ms: float) -> dict:
        rows = [{"batch_size": b, "fp8_ms": ms * b, "bf16_ms": 1.3 * ms * b} for b in (1, 2, 4)]
        return {"model": "v2-lite", "context": 1024, "device": "test", "results": rows}

    paths = []
    for name, ms in (("two", 1.0), ("one", 0.9)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run(ms)))
    png = tmp_path / "overlay.png"
    assert decode_step_fp8.main(["--overlay", f"two launches={paths[0]}", f"one launch={paths[1]}",
                                 "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        decode_step_fp8.main(["--overlay", f"two launches={paths[0]}"])  # no --png
    with pytest.raises(SystemExit):
        decode_step_fp8.main(["--overlay", str(paths[0]), "--png", str(png)])  # no label


def test_each_step_is_cut_into_its_gemms_the_shared_kernels_and_the_rest_and_replotted(tmp_path: Path) -> None:
    """The shared kernels are the FP8 profile's non-GEMM names, found in the bf16 profile by name; whatever else
    the bf16 profile lists is its GEMMs; the serial profile is read where there is one."""
    shared = [{"kernel": "_mla_decode_split_kernel", "us_per_step": 200.0},
              {"kernel": "nvjet_sm90_tst_512x8_64x3_2x1_v_bz_TNT", "us_per_step": 150.0}]  # the LM head
    fp8 = {"graph": {"ms": 2.6}, "graph_profile": [{"kernel": "_fp8_moe_gemm_kernel", "us_per_step": 9000.0}],
           "graph_profile_serial": [{"kernel": "_fp8_moe_gemm_kernel", "us_per_step": 1100.0},
                                    {"kernel": "_fp8_gemm_kernel", "us_per_step": 300.0}, *shared]}
    base = {"graph": {"ms": 3.0}, "graph_profile_serial": [{"kernel": "_moe_gemm_kernel", "us_per_step": 1500.0},
                                                           {"kernel": "nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT",
                                                            "us_per_step": 370.0}, *shared]}
    cut = decode_step_fp8.breakdown(base, fp8)
    assert cut["fp8"] == pytest.approx({"gemm_ms": 1.4, "other_kernels_ms": 0.35, "rest_ms": 0.85})
    assert cut["bf16"] == pytest.approx({"gemm_ms": 1.87, "other_kernels_ms": 0.35, "rest_ms": 0.78})
    assert decode_step_fp8.breakdown({"graph": {"ms": 3.0}}, fp8) == {}
    row = {"batch_size": 1, "bf16_ms": 3.0, "fp8_ms": 2.6, "fp8_over_bf16": 2.6 / 3.0}
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"model": "v2-lite", "context": 1024, "device": "test", "results": [row],
                               "reports": {"bf16": {"results": [base]}, "fp8": {"results": [fp8]}}}))
    png = tmp_path / "breakdown.png"
    assert decode_step_fp8.main(["--replot", str(run), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        decode_step_fp8.main(["--replot", str(run)])  # no --png


def test_the_fixed_cost_is_what_is_left_of_the_fp8_step_without_its_bytes_and_the_goal_bounds_it() -> None:
    # FP8 2.6 ms for 2 GB, bf16 3.0 ms for 4 GB: this run's extra bytes cost 0.2 ms a GB (0.25 at 4000 GB/s).
    fp8 = {"graph": {"ms": 2.6}, "step_bytes": {"total": 2e9}}
    base = {"graph": {"ms": 3.0}, "step_bytes": {"total": 4e9}}
    cost = decode_step_fp8.fixed_cost(base, fp8, 4000.0)
    assert cost["fixed_ms_hidden"] == pytest.approx(2.2) and cost["fixed_ms_copy"] == pytest.approx(2.1)
    # FP8 <= 0.65 x bf16 with F + bytes x c on both sides: F <= (0.65 x 4 - 2) GB x c / 0.35.
    assert cost["goal_fixed_ms_hidden"] == pytest.approx(0.6 * 0.2 / 0.35)
    assert cost["goal_fixed_ms_copy"] == pytest.approx(0.6 * 0.25 / 0.35)
    f = cost["goal_fixed_ms_copy"]  # at that F the model gives the goal exactly
    assert (f + 2 * 0.25) / (f + 4 * 0.25) == pytest.approx(decode_step_fp8.GOAL_AT_BATCH_1)
    assert set(decode_step_fp8.fixed_cost(base, fp8, None)) == {"fixed_ms_hidden", "goal_fixed_ms_hidden"}
    assert decode_step_fp8.fixed_cost(base, {**fp8, "step_bytes": {"total": 4e9}}, 4000.0) == {}  # CPU: same bytes
