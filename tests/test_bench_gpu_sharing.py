"""The one-GPU sharing options of the serving benches, checked where no GPU is needed."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import compare_pd, gpu_mps


def test_an_sm_share_is_a_percentage_and_a_cap_is_logged_as_untrustworthy(caplog: pytest.LogCaptureFixture) -> None:
    assert gpu_mps.sm_share_env(None) == {}
    assert gpu_mps.sm_share_env(100) == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"} and not caplog.records
    assert gpu_mps.sm_share_env(40) == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "40"}
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "wrong GEMMs" in caplog.text
    assert gpu_mps.client_env(40, True) == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "40", "CUDA_MPS_CLIENT_PRIORITY": "1"}
    assert gpu_mps.client_env(None, False) == {}
    for bad in (0, 101, -5):
        with pytest.raises(ValueError, match="percentage"):
            gpu_mps.sm_share_env(bad)


def test_mps_without_its_control_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    assert not gpu_mps.mps_available()
    with pytest.raises(RuntimeError, match="cannot run MPS"), gpu_mps.mps_daemon(tmp_path / "mps"):
        pass


def test_compare_pd_runs_the_setups_it_is_given_and_refuses_unknown_ones() -> None:
    parser = compare_pd.build_parser()
    assert parser.parse_args([]).setups == ("1p1d", "colocated")
    assert parser.parse_args(["--setups", "1p1d"]).setups == ("1p1d",)
    assert parser.parse_args(["--setups", "colocated,1p1d,1p1d"]).setups == ("colocated", "1p1d")
    with pytest.raises(SystemExit):
        parser.parse_args(["--setups", "1p2d"])
    with pytest.raises(argparse.ArgumentTypeError, match="setups are"):
        compare_pd._setups(",")


def test_the_comparison_table_leaves_a_missing_setup_as_n_a() -> None:
    summary = {"ttft_ms": {"p50": 10.0, "p99": 20.0}, "itl_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0},
               "e2e_ms": {"p50": 30.0},
               "request_throughput": 5.0, "output_throughput": 50.0, "total_token_throughput": 500.0}
    rows = compare_pd.comparison_rows({"1p1d": {"summary": summary}})
    assert all(row["colocated"] is None and row["ratio_1p1d_over_colocated"] is None for row in rows)
    assert "n/a" in compare_pd.format_table(rows, "title")


def test_every_bench_that_starts_a_1p1d_setup_takes_the_flags_it_reads() -> None:
    # bench.host_path calls compare_pd.start_setup with its own parser's namespace: when compare_pd gained the
    # MPS flags, host_path's namespace lacked them and it failed at start-up (AttributeError).
    from bench import host_path

    for parser, argv in ((compare_pd.build_parser(), []), (host_path.build_parser(), ["--label", "x"])):
        args = parser.parse_args([*argv, "--mps", "--mps-prefill-sm", "60", "--mps-decode-sm", "40",
                                  "--mps-low-priority", "decode"])
        assert (args.mps, args.mps_prefill_sm, args.mps_decode_sm, args.mps_low_priority) == (True, 60, 40, "decode")
        plain = parser.parse_args(argv)
        assert plain.mps is None and not compare_pd.use_mps(plain)  # the default: MPS on CUDA only
        assert parser.parse_args([*argv, "--no-mps"]).mps is False
        assert "--max-prefill-tokens" not in compare_pd._worker_flags(plain, 1)  # the workers' own default
        chunked = parser.parse_args([*argv, "--max-prefill-tokens", "16384"])
        assert compare_pd._worker_flags(chunked, 1)[-2:] == ["--max-prefill-tokens", "16384"]


def test_a_result_names_the_gpus_nvidia_smi_lists_and_none_where_it_cannot(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_mps.gpu_names() == []  # no nvidia-smi
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf 'NVIDIA H200\\nNVIDIA H200\\n'\n")
    smi.chmod(0o755)
    assert gpu_mps.gpu_names() == ["NVIDIA H200", "NVIDIA H200"]
    smi.write_text("#!/bin/sh\nexit 9\n")
    assert gpu_mps.gpu_names() == []


def test_mps_is_the_default_on_cuda_where_its_daemon_is_installed(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """One GPU's two servers run under MPS unless told otherwise, as scripts/launch_1p1d.sh deploys them
    (TANDEM_MPS=auto); without the control daemon, or on CPU, they run without it; the flags win either way."""
    parser = compare_pd.build_parser()
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control
    assert not compare_pd.use_mps(parser.parse_args(["--device", "cuda"]))
    control = tmp_path / gpu_mps.CONTROL
    control.write_text("#!/bin/sh\nexit 0\n")
    control.chmod(0o755)
    assert compare_pd.use_mps(parser.parse_args(["--device", "cuda"]))
    assert not compare_pd.use_mps(parser.parse_args(["--device", "cuda", "--no-mps"]))
    assert not compare_pd.use_mps(parser.parse_args(["--device", "cpu"]))
    assert compare_pd.use_mps(parser.parse_args(["--device", "cpu", "--mps"]))
