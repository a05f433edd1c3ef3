"""Memory plan of one instance: per rank, the bytes of weights, activations, CUDA graphs and KV, and how
many KV tokens fit — before launch.

    python -m engine.plan --model DIR|deepseek-v3 --tp N --dp M [--attention-dp mla-core] [--quantization fp8] \
        [--kv-cache-dtype auto|bfloat16|fp8_e4m3] --gpu-memory-gb 141 [--mem-fraction 0.9] \
        [--page-size 64] [--cuda-graph-max-bs 0] [--max-prefill-tokens 8192] [--json]

Weights are counted as tandem shards them (engine/model.py, engine/attention.py, engine/moe.py):
  * attention projections that take the latent (q_b_proj / q_proj, kv_b_proj, o_proj) are split over the
    ``attn_tp = tp / dp`` ranks of an attention-DP group, so they are replicated across DP groups; q_a_proj,
    kv_a_proj_with_mqa and every norm are whole on every rank;
  * the embedding and LM head are vocab-parallel over attn_tp (each rank holds ``ceil(vocab / attn_tp)`` rows);
  * dense MLPs and shared experts are split over attn_tp; routed experts over all ``tp`` ranks (EP);
  * the MoE router (``gate``) is kept in float32 whatever the model dtype.
  * ``--attention-dp mla-core`` (dp 1) shards weights as TP does, but each rank's pool holds its own requests'
    latent KV: the instance holds ``tp`` times one rank's KV tokens (whole attention: ``dp`` times).
With ``--quantization fp8`` every linear weight above (not the embedding, LM head, norms or router) is
float8_e4m3fn plus one float32 scale per 128x128 block of its shard (DeepSeek-V3's ``weight_scale_inv``).

Assumptions of the estimates (stated in the table too):
  * memory: ``--gpu-memory-gb`` in GB of 10^9 bytes (141 for an H200: nvidia-smi's 143771 MiB is 150.8e9, so
    the decimal reading errs on the safe side); ``--mem-fraction`` of it is planned, the rest is left to the
    CUDA context, NCCL / DeepEP buffers and allocator fragmentation, which are not modelled.
  * activations: the peak of one prefill forward of ``--max-prefill-tokens`` tokens in a DP group (no cached
    prefix, fused SDPA prefill so no score matrix): 4 hidden-size buffers of the residual stream, plus the
    largest of one attention, dense-MLP or MoE layer's temporaries (MoE: the rank's dispatched rows with 2x
    headroom for routing imbalance, send and receive buffers), plus the logits of ``--max-running-requests``
    rows (model dtype and float32) and the Triton decode's split-K scratch.
  * CUDA graphs: one memory pool shared by every captured batch size, so the largest bucket's decode
    activations, plus 2 MiB of graph state per bucket.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.config import ModelConfig

GB = 10**9
BUILTIN_CONFIGS = Path(__file__).parent / "model_configs"  # deepseek-v3, deepseek-v2-lite
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_CACHE_BYTES: dict[str, int | None] = {"auto": None, "bfloat16": 2, "fp8_e4m3": 1}  # None: model dtype
QUANTIZATIONS = ("fp8",)
DEFAULT_MEM_FRACTION = 0.9
ROUTING_HEADROOM = 2  # MoE rows per rank over the balanced share
DECODE_SM_PROGRAMS = 4 * 132  # Triton decode's split target: 4 programs per SM on an H100/H200 (132 SMs)
GRAPH_STATE_BYTES = 2 << 20  # per captured bucket


class PlanError(ValueError):
    """A plan that cannot be made (unknown model, bad numbers)."""


@dataclass(frozen=True)
class PlanSpec:
    """What the plan is made for. dtype: activations and unquantized weights ("bfloat16" on GPUs)."""

    tp: int
    dp: int = 1
    quantization: str | None = None
    dtype: str = "bfloat16"
    kv_cache_dtype: str = "auto"
    gpu_memory_gb: float = 141.0
    mem_fraction: float = DEFAULT_MEM_FRACTION
    page_size: int = 64
    cuda_graph_max_bs: int = 0
    max_prefill_tokens: int = 8192
    max_running: int = 256
    fp8_block: tuple[int, int] = (128, 128)
    attention_dp: str = "whole"  # or "mla-core" (engine.runtime.launch.ATTENTION_DP_MODES)

    def __post_init__(self) -> None:
        if self.attention_dp not in ("whole", "mla-core"):
            raise PlanError(f"unknown attention dp {self.attention_dp!r} (choose from whole, mla-core)")
        if self.attention_dp == "mla-core" and self.dp != 1:
            raise PlanError(f"--attention-dp mla-core takes dp 1, not {self.dp}")
        if self.tp < 1 or self.dp < 1 or self.tp % self.dp:
            raise PlanError(f"tp ({self.tp}) must be a positive multiple of dp ({self.dp})")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise PlanError(f"unknown quantization {self.quantization!r} (choose from {', '.join(QUANTIZATIONS)})")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPE_BYTES)})")
        if self.kv_cache_dtype not in KV_CACHE_BYTES:
            raise PlanError(f"unknown kv cache dtype {self.kv_cache_dtype!r} (choose from {', '.join(KV_CACHE_BYTES)})")
        if not self.gpu_memory_gb > 0 or not 0 < self.mem_fraction <= 1:
            raise PlanError(f"need gpu memory > 0 and 0 < mem fraction <= 1, got {self.gpu_memory_gb}, "
                            f"{self.mem_fraction}")
        if min(self.page_size, self.max_prefill_tokens, self.max_running) < 1 or self.cuda_graph_max_bs < 0:
            raise PlanError("page size, prefill tokens and running requests must be >= 1, graphs >= 0")

    @property
    def attn_tp(self) -> int:
        return self.tp // self.dp

    @property
    def kv_groups(self) -> int:
        """How many ranks' pools hold distinct KV: the DP groups, or every rank under MLA-core DP."""
        return self.tp if self.attention_dp == "mla-core" else self.dp

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes(self) -> int:
        return KV_CACHE_BYTES[self.kv_cache_dtype] or self.dtype_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank. Every rank of an instance holds the same amounts (shards are equal; vocab shards
    are padded to equal size), so one rank's numbers are every rank's."""

    model: str
    spec: PlanSpec
    weights: dict[str, int]
    activations: int
    cuda_graphs: int
    kv_bytes_per_token: int
    num_layers: int
    kv_dim: int
    notes: list[str] = field(default_factory=list)

    @property
    def budget(self) -> int:
        return int(self.spec.gpu_memory_gb * GB * self.spec.mem_fraction)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def fixed(self) -> int:
        """Everything but the KV pool."""
        return self.weights_total + self.activations + self.cuda_graphs

    @property
    def kv_pool_bytes(self) -> int:
        """The largest pool of whole pages that fits beside the rest (0 when nothing is left)."""
        page = self.kv_bytes_per_token * self.spec.page_size
        return max(0, self.budget - self.fixed) // page * page

    @property
    def kv_tokens_per_rank(self) -> int:
        return self.kv_pool_bytes // self.kv_bytes_per_token

    @property
    def kv_tokens_per_dp_group(self) -> int:
        # Every rank of an attention-DP group holds the group's whole latent KV (replicated, not sharded).
        return self.kv_tokens_per_rank

    @property
    def kv_tokens_instance(self) -> int:
        return self.kv_tokens_per_rank * self.spec.kv_groups

    @property
    def fits(self) -> bool:
        """Weights, activations and graphs leave room for at least one KV page."""
        return self.kv_pool_bytes > 0

    def shortfall(self, pool_bytes: int) -> str | None:
        """Why a pool of `pool_bytes` per rank does not fit beside the rest, or None when it does."""
        need = self.fixed + pool_bytes
        if need <= self.budget:
            return None
        return (f"needs {_gb(need)} GB per rank (weights {_gb(self.weights_total)} + activations "
                f"{_gb(self.activations)} + CUDA graphs {_gb(self.cuda_graphs)} + KV pool {_gb(pool_bytes)}) but "
                f"{self.spec.mem_fraction:g} x {self.spec.gpu_memory_gb:g} GB = {_gb(self.budget)} GB is planned")

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "spec": asdict(self.spec),
            "attn_tp": self.spec.attn_tp,
            "per_rank_bytes": {
                "weights": dict(self.weights),
                "weights_total": self.weights_total,
                "activations": self.activations,
                "cuda_graphs": self.cuda_graphs,
                "kv_pool": self.kv_pool_bytes,
                "budget": self.budget,
            },
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_tokens_per_rank": self.kv_tokens_per_rank,
            "kv_tokens_per_dp_group": self.kv_tokens_per_dp_group,
            "kv_tokens_instance": self.kv_tokens_instance,
            "fits": self.fits,
            "notes": list(self.notes),
        }

    def table(self) -> str:
        s = self.spec
        weights = f"fp8 + {s.fp8_block[0]}x{s.fp8_block[1]} block scales" if s.quantization else s.dtype
        kv_name = s.kv_cache_dtype if s.kv_cache_dtype != "auto" else f"auto = {s.dtype}"
        lines = [
            f"{self.model}: tp {s.tp}, dp {s.dp} (attn_tp {s.attn_tp})"
            f"{', attention-dp mla-core' if s.attention_dp == 'mla-core' else ''}; weights {weights}; "
            f"KV cache {kv_name}",
            f"memory per rank: {s.gpu_memory_gb:g} GB x mem-fraction {s.mem_fraction:g} = {_gb(self.budget)} GB",
            "",
            f"{'per rank':<44}{'GB':>10}",
        ]
        lines += [f"  {name:<42}{_gb(n):>10}" for name, n in self.weights.items() if n]
        lines += [
            f"  {'weights total':<42}{_gb(self.weights_total):>10}",
            f"  {f'activations ({s.max_prefill_tokens}-token prefill chunk)':<42}{_gb(self.activations):>10}",
            f"  {f'CUDA graphs (max bs {s.cuda_graph_max_bs})':<42}{_gb(self.cuda_graphs):>10}",
            f"  {f'KV pool ({s.page_size}-token pages)':<42}{_gb(self.kv_pool_bytes):>10}",
            "",
            f"KV bytes per token per rank: {self.kv_bytes_per_token} "
            f"({self.kv_dim} values x {self.num_layers} layers x {s.kv_bytes} B)",
            f"KV tokens per rank = per DP group: {self.kv_tokens_per_rank:,}; instance (x {s.kv_groups} "
            f"{'ranks, mla-core' if s.attention_dp == 'mla-core' else 'DP'}): {self.kv_tokens_instance:,}",
        ]
        if self.fits:
            lines.append("fits")
        else:
            lines.append(f"does NOT fit: weights + activations + CUDA graphs {self.shortfall(0) or ''}".rstrip())
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GB:.2f}"


def weight_bytes(config: ModelConfig, spec: PlanSpec) -> dict[str, int]:
    """Bytes of one rank's parameters by part, sharded as tandem shards them (module docstring)."""
    c, r, b = config, spec.attn_tp, spec.dtype_bytes
    fp8 = spec.quantization == "fp8"
    block_out, block_in = spec.fp8_block
    out: dict[str, int] = defaultdict(int)

    def linear(part: str, rows: int, cols: int, count: int = 1) -> None:
        """A [rows, cols] weight shard (count of them); FP8 adds its float32 block scales."""
        if fp8:
            out[part] += count * rows * cols
            out["fp8 block scales"] += count * math.ceil(rows / block_out) * math.ceil(cols / block_in) * 4
        else:
            out[part] += count * rows * cols * b

    vocab_rows = math.ceil(c.vocab_size / r)
    out["embedding (vocab / attn_tp)"] = vocab_rows * c.hidden_size * b
    out["lm_head (vocab / attn_tp)"] = vocab_rows * c.hidden_size * b
    heads = c.num_attention_heads // r
    norms = c.hidden_size  # the final norm
    attn = "attention (latent side / attn_tp)"
    for layer in range(c.num_hidden_layers):
        norms += 2 * c.hidden_size + c.kv_lora_rank
        if c.q_lora_rank is None:
            linear(attn, heads * c.qk_head_dim, c.hidden_size)
        else:
            linear(attn, c.q_lora_rank, c.hidden_size)
            linear(attn, heads * c.qk_head_dim, c.q_lora_rank)
            norms += c.q_lora_rank
        linear(attn, c.kv_cache_dim, c.hidden_size)
        linear(attn, heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        linear(attn, c.hidden_size, heads * c.v_head_dim)
        if c.attention_bias:
            out["biases"] += ((c.q_lora_rank or 0) + c.kv_cache_dim + c.hidden_size) * b
        if c.is_moe_layer(layer):
            out["router (float32)"] += c.n_routed_experts * c.hidden_size * 4
            if c.topk_method == "noaux_tc":
                out["router (float32)"] += c.n_routed_experts * 4
            local = c.n_routed_experts // spec.tp
            inter = c.moe_intermediate_size
            # Gate and up are separate checkpoint tensors (separate block scales), packed as w13 in memory.
            linear("routed experts (experts / tp)", inter, c.hidden_size, 2 * local)
            linear("routed experts (experts / tp)", c.hidden_size, inter, local)
            if c.n_shared_experts:
                shared = inter * c.n_shared_experts // r
                linear("shared experts (/ attn_tp)", shared, c.hidden_size, 2)
                linear("shared experts (/ attn_tp)", c.hidden_size, shared)
        else:
            dense = c.intermediate_size // r
            linear("dense MLP (/ attn_tp)", dense, c.hidden_size, 2)
            linear("dense MLP (/ attn_tp)", c.hidden_size, dense)
    out["norms"] = norms * b
    return dict(out)


def _layer_activations(config: ModelConfig, spec: PlanSpec, tokens: int) -> int:
    """Peak bytes of one forward of `tokens` tokens in this rank's DP group (module docstring)."""
    c, r, b = config, spec.attn_tp, spec.dtype_bytes
    heads = c.num_attention_heads // r
    residual = 4 * tokens * c.hidden_size * b
    attention = tokens * ((c.q_lora_rank or 0) + 2 * heads * c.qk_head_dim + c.kv_cache_dim
                          + heads * (c.qk_nope_head_dim + c.v_head_dim) + heads * c.qk_head_dim
                          + heads * c.v_head_dim) * b
    dense = 3 * tokens * (c.intermediate_size // r) * b
    moe = 0
    if c.n_routed_experts:
        # Instance-wide rows dp * tokens * top_k, spread over tp ranks: tokens * top_k / attn_tp each.
        rows = ROUTING_HEADROOM * math.ceil(tokens * c.num_experts_per_tok / r)
        shared = 3 * tokens * (c.moe_intermediate_size * c.n_shared_experts // r) * b
        moe = rows * (3 * c.hidden_size + 3 * c.moe_intermediate_size) * b + shared
        moe += 2 * tokens * c.n_routed_experts * 4  # router logits and scores in float32
    return residual + max(attention, dense, moe)


def _decode_extra(config: ModelConfig, spec: PlanSpec, batch: int) -> int:
    """Logits of `batch` rows (model dtype, float32 for sampling) + the Triton decode's split-K scratch."""
    heads = config.num_attention_heads // spec.attn_tp
    logits = batch * config.vocab_size * (spec.dtype_bytes + 4)
    split_scratch = (batch + DECODE_SM_PROGRAMS) * heads * (config.kv_lora_rank + 1) * 4
    exchange = 0
    if spec.attention_dp == "mla-core":  # the head all-to-all's buffers: queries out and back, outputs back
        exchange = 2 * batch * heads * (config.kv_cache_dim + config.kv_lora_rank) * spec.dtype_bytes
    return logits + split_scratch + exchange


def make_plan(config: ModelConfig, spec: PlanSpec, model: str = "model") -> MemoryPlan:
    """The memory plan of `config` on `spec`; refuses layouts tandem cannot split the model over."""
    if config.num_attention_heads % spec.attn_tp:
        raise PlanError(f"num_attention_heads ({config.num_attention_heads}) is not divisible by attn_tp "
                        f"({spec.attn_tp})")
    if config.n_routed_experts % spec.tp:
        raise PlanError(f"n_routed_experts ({config.n_routed_experts}) is not divisible by tp ({spec.tp})")
    shared = config.moe_intermediate_size * config.n_shared_experts
    for name, size in (("intermediate_size", config.intermediate_size), ("shared experts' intermediate size", shared)):
        if size % spec.attn_tp:
            raise PlanError(f"{name} ({size}) is not divisible by attn_tp ({spec.attn_tp})")
    activations = (_layer_activations(config, spec, spec.max_prefill_tokens)
                   + _decode_extra(config, spec, spec.max_running))
    graphs = 0
    if spec.cuda_graph_max_bs:
        from engine.cuda_graph import capture_bucket_sizes  # torch: only when graphs are planned

        bs = spec.cuda_graph_max_bs
        buckets = len(capture_bucket_sizes(bs))
        graphs = _layer_activations(config, spec, bs) + _decode_extra(config, spec, bs) + buckets * GRAPH_STATE_BYTES
    notes = []
    if spec.quantization and spec.kv_cache_dtype == "auto":
        notes.append("FP8 weights keep a bf16 KV cache unless --kv-cache-dtype fp8_e4m3")
    return MemoryPlan(model=model, spec=spec, weights=weight_bytes(config, spec), activations=activations,
                      cuda_graphs=graphs, kv_bytes_per_token=config.kv_cache_dim * config.num_hidden_layers
                      * spec.kv_bytes, num_layers=config.num_hidden_layers, kv_dim=config.kv_cache_dim,
                      notes=notes)


def load_model_config(model: str) -> tuple[ModelConfig, str | None, tuple[int, int] | None, str]:
    """(config, quantization named by the checkpoint, its FP8 block, display name) of a checkpoint folder
    or a built-in name (a folder of engine/model_configs, e.g. deepseek-v3)."""
    path = Path(model)
    if not (path / "config.json").is_file():
        builtin = BUILTIN_CONFIGS / model
        if not (builtin / "config.json").is_file():
            names = ", ".join(sorted(p.name for p in BUILTIN_CONFIGS.iterdir() if (p / "config.json").is_file()))
            raise PlanError(f"{model!r} is neither a checkpoint folder with a config.json nor a built-in model "
                            f"({names})")
        path = builtin
    raw = json.loads((path / "config.json").read_text())
    # The plan reads a quantized checkpoint's shapes whether or not this build loads it.
    quant = raw.pop("quantization_config", None) or {}
    quantization = None
    block: tuple[int, int] | None = None
    if quant:
        method = str(quant.get("quant_method", ""))
        if method != "fp8":
            raise PlanError(f"{path}/config.json: quantization {method!r} is not planned (only fp8)")
        quantization = "fp8"
        size = quant.get("weight_block_size") or [128, 128]
        block = (int(size[0]), int(size[1]))
    return ModelConfig.from_dict(raw), quantization, block, path.name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from engine.kv_pool import KV_CACHE_DTYPES

    parser = argparse.ArgumentParser(prog="python -m engine.plan", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder, or a built-in name: deepseek-v3, "
                                                       "deepseek-v2-lite")
    parser.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1)
    parser.add_argument("--dp", "--dp-size", dest="dp", type=int, default=1)
    parser.add_argument("--attention-dp", choices=["whole", "mla-core"], default="whole",
                        help="mla-core: TP weights, each request's KV on one rank (needs --dp 1)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="weights in FP8 with 128x128 block scales; default: what the checkpoint's "
                             "quantization_config says")
    parser.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16",
                        help="activations and unquantized weights")
    parser.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto")
    parser.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU, GB of 1e9 bytes")
    parser.add_argument("--mem-fraction", "--mem-fraction-static", dest="mem_fraction", type=float,
                        default=DEFAULT_MEM_FRACTION, help="share of it planned (the rest: CUDA context, NCCL)")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--cuda-graph-max-bs", type=int, default=0)
    parser.add_argument("--max-prefill-tokens", "--chunked-prefill-size", dest="max_prefill_tokens", type=int,
                        default=8192)
    parser.add_argument("--max-running-requests", dest="max_running", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, quantization, block, name = load_model_config(args.model)
        spec = PlanSpec(tp=args.tp, dp=args.dp, quantization=args.quantization or quantization, dtype=args.dtype,
                        kv_cache_dtype=args.kv_cache_dtype, gpu_memory_gb=args.gpu_memory_gb,
                        mem_fraction=args.mem_fraction, page_size=args.page_size,
                        cuda_graph_max_bs=args.cuda_graph_max_bs, max_prefill_tokens=args.max_prefill_tokens,
                        max_running=args.max_running, fp8_block=block or (128, 128),
                        attention_dp=args.attention_dp)
        plan = make_plan(config, spec, name)
    except (PlanError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
