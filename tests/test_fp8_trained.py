"""FP8 as served (weights FP8, activations quantized per 1x128 group on the fly) against the dequantized model,
on the trained tiny V3 FP8 checkpoint (tests/trained_fp8.py says why trained), through the CPU references.
tests/test_fp8_gpu.py runs the same comparison with the GPU kernels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trained_fp8 import (  # noqa: F401 (trained_fp8_checkpoint: the trained_fp8_dir fixture)
    NEW_TOKENS,
    TRAINED_FP8_LOGITS_TOL,
    first_differences,
    teacher_forced_logits,
    trained_fp8_checkpoint,
    trained_prompts,
)

import engine.quant
from engine.llm import LLM
from engine.sampling import SamplingParams
from kernels.fp8 import ACT_ENV, FP8_DTYPE


@pytest.mark.parametrize("act", ["fp8", "auto"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_keeps_the_dequantized_models_greedy_tokens(trained_fp8_dir: Path, dtype: str, act: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``act`` fp8: every GEMM input quantized (DeepSeek's recipe, the hard case); auto: what serving runs
    (W8A16 at decode sizes, ``kernels.fp8.quantizes_activations``)."""
    monkeypatch.setenv(ACT_ENV, act)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = trained_prompts()
    ref = LLM(str(trained_fp8_dir), dtype=dtype, page_size=16, num_pages=256, quantization="none")
    try:
        assert ref.model.model.layers[1].mlp.w13.dtype != FP8_DTYPE
        want = [o.token_ids for o in ref.generate(prompts, greedy)]
        ref_logits = [teacher_forced_logits(ref, p + w[:-1]) for p, w in zip(prompts, want, strict=True)]
    finally:
        ref.close()
    # What the GPU runs, through the torch references: FP8 weights, each GEMM input quantized per token group.
    monkeypatch.setattr(engine.quant, "fp8_kernels_run_on", lambda device: True)
    fp8 = LLM(str(trained_fp8_dir), dtype=dtype, page_size=16, num_pages=256, cuda_graph_max_bs=8)
    try:
        assert fp8.model.model.layers[1].mlp.w13.dtype == FP8_DTYPE
        got = [o.token_ids for o in fp8.generate(prompts, greedy)]
        rels = [((teacher_forced_logits(fp8, p + w[:-1]) - r).norm() / r.norm()).item()
                for p, w, r in zip(prompts, want, ref_logits, strict=True)]
    finally:
        fp8.close()
    print(f"{dtype} {act}: first differences {first_differences(got, want)}, logits rel {[f'{r:.4f}' for r in rels]}")
    assert got == want
    assert len({t for tokens in want for t in tokens}) > 50  # the greedy walk is not stuck on a few tokens
    assert max(rels) < TRAINED_FP8_LOGITS_TOL
    if act == "fp8":
        assert min(rels) > 1e-3  # the activations were quantized (unquantized would give ~1e-6 in float32)
