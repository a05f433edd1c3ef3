"""The start-up check of a rank under an MPS SM cap (`engine.mps_cap_check`), run on CPU: the check itself is
device-agnostic; on a GPU it runs where the cap is set (`build_rank_engine`, `LLM`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import mps_cap_check
from engine.config import ModelConfig
from engine.tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    return ModelConfig.from_dir(write_tiny_model(tmp_path_factory.mktemp("tiny"), "v3", seed=3))


def test_only_a_cap_below_100_percent_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in (("", None), ("100", None), ("junk", None), ("0", None), ("70", 70.0), ("95.5", 95.5)):
        monkeypatch.setenv(mps_cap_check.CAP_ENV, value)
        assert mps_cap_check.sm_cap_percent() == expected, value


def test_the_shapes_are_the_layer_s_dense_gemms() -> None:
    v2_lite = ModelConfig.from_dir("engine/model_configs/deepseek-v2-lite")
    # the fused query + latent projection, kv_b from the 576-wide latent row, o_proj, the dense MLP's halves
    assert mps_cap_check.dense_shapes(v2_lite) == [(2048, 3648, 2048), (512, 4096, 576), (2048, 2048, 2048),
                                                   (2048, 21888, 2048), (10944, 2048, 10944)]


def test_a_capped_rank_refuses_to_start_when_a_product_is_wrong_and_starts_when_all_are_right(
        monkeypatch: pytest.MonkeyPatch, config: ModelConfig) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv(mps_cap_check.CAP_ENV, raising=False)
    calls = []
    real_linear = F.linear

    def counted(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(w.shape))
        return real_linear(x, w)

    monkeypatch.setattr(mps_cap_check.F, "linear", counted)
    mps_cap_check.check_gemms_under_sm_cap(config, cpu, rows=64)
    assert not calls  # no cap: nothing multiplied
    monkeypatch.setenv(mps_cap_check.CAP_ENV, "70")
    mps_cap_check.check_gemms_under_sm_cap(config, cpu, rows=64)
    assert len(calls) == 2 * len(mps_cap_check.dense_shapes(config))  # at 8 rows and at 64, all right

    def wrong_once_wide(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # what cuBLAS did under a 55-90 % cap
        out = real_linear(x, w)
        if x.shape[0] == 64 and w.shape[0] == 2 * config.intermediate_size:
            out[: x.shape[0] // 4] = float("nan")
        return out

    monkeypatch.setattr(mps_cap_check.F, "linear", wrong_once_wide)
    wide = 2 * config.intermediate_size
    with pytest.raises(RuntimeError, match=rf"cap of 70 % .*64x\d+ by \d+x{wide} .*relative error nan"):
        mps_cap_check.check_gemms_under_sm_cap(config, cpu, rows=64)

    def off_by_a_fifth(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return real_linear(x, w) * 1.2

    monkeypatch.setattr(mps_cap_check.F, "linear", off_by_a_fifth)
    with pytest.raises(RuntimeError, match="relative error 0.2"):
        mps_cap_check.check_gemms_under_sm_cap(config, cpu, rows=64)


def test_the_check_multiplies_at_most_max_rows_however_many_prefill_tokens_a_rank_takes(
        monkeypatch: pytest.MonkeyPatch, config: ModelConfig) -> None:
    asked = []

    def recorded(config: ModelConfig, device: torch.device, rows: int, dtype: torch.dtype):
        asked.append(rows)
        return iter(())

    monkeypatch.setattr(mps_cap_check, "gemm_errors", recorded)
    monkeypatch.setenv(mps_cap_check.CAP_ENV, "70")
    for rows in (64, mps_cap_check.MAX_ROWS, 16384):
        mps_cap_check.check_gemms_under_sm_cap(config, torch.device("cpu"), rows=rows)
    assert asked == [64, 4096, 4096]
