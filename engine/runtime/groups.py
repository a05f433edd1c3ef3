"""The process groups of one instance, built from a rank's ``RankContext``, and the start-up check
that a model fits a parallel layout.

Ranks ``[g * attn_tp, (g + 1) * attn_tp)`` form attention-DP group ``g`` (DESIGN.md's vocabulary). Every
rank must create every group, in the same order (``torch.distributed.new_group`` is a collective), even
the groups it is not in.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from engine.config import ModelConfig
from engine.eplb.config import EplbConfig
from engine.parallel import ParallelContext
from engine.runtime.launch import InstanceSpec, LayoutError, RankContext
from kernels.ep_deepep import deepep_unavailable_reason

log = logging.getLogger(__name__)

EP_BACKENDS = ("a2a", "local", "deepep")


def resolve_ep_backend(name: str, spec: InstanceSpec, *, mode: str | None = None,
                       dtype: torch.dtype | None = None, hidden_size: int | None = None) -> str:
    """The EP backend to run: ``auto`` is ``local`` on one rank, else ``deepep`` where it can serve this
    layout (CUDA, deep_ep importable, 2/4/8 ranks per node, bf16...) and ``a2a`` otherwise; it logs its
    choice and why. ``deepep`` asked for where it cannot run is a ``LayoutError`` saying why.

    ``auto`` considers ``deepep`` only when ``mode`` and ``dtype`` are given (DeepEP is bf16 only, and
    its low-latency mode has its own limits), so a caller that does not pass them gets ``a2a``.
    """
    if name in ("auto", "deepep") and spec.tp_size > 1:
        reason = deepep_unavailable_reason(spec.tp_size, mode=mode, dtype=dtype, hidden_size=hidden_size,
                                           device=spec.device, num_nodes=spec.nnodes)
        if name == "deepep":
            if reason is not None:
                raise LayoutError(f"--ep-backend deepep cannot run here: {reason}")
            return name
        if reason is None and (mode is None or dtype is None):
            reason = "the EP mode and dtype were not given to resolve_ep_backend"
        choice = "a2a" if reason else "deepep"
        log.info("--ep-backend auto chose %s for tp=%d %s mode%s", choice, spec.tp_size, mode,
                 f" (deepep: {reason})" if reason else "")
        if choice == "deepep":  # what ran is in docs/deepep.md: NVLink within one node, never this flag's pick
            log.warning("--ep-backend auto picked deepep for tp=%d on %d node(s) in %s mode: a layout tandem's "
                        "tests have not run end to end (docs/deepep.md); pass --ep-backend a2a to avoid it",
                        spec.tp_size, spec.nnodes, mode)
        return choice
    if name == "auto":
        log.info("--ep-backend auto chose local (one rank holds every expert)")
        return "local"
    if name == "deepep":
        raise LayoutError("--ep-backend deepep needs tp >= 2 (DeepEP's kernels serve 2, 4 or 8 ranks per node); "
                          "one rank uses local")
    if name not in EP_BACKENDS:
        raise LayoutError(f"unknown --ep-backend {name!r}; choose one of auto, {', '.join(EP_BACKENDS)}")
    return name


def build_parallel_context(ctx: RankContext) -> ParallelContext:
    """This rank's ``ParallelContext``: the whole instance as the TP/EP group, its DP group's ranks as the
    attention-TP group. Needs torch.distributed initialised (the launcher does it)."""
    spec = ctx.spec
    if spec.tp_size == 1:
        return ParallelContext.single()
    attn_tp = spec.attn_tp_size
    attn_groups = [dist.new_group(list(range(g * attn_tp, (g + 1) * attn_tp))) for g in range(spec.dp_size)]
    return ParallelContext(
        tp_rank=ctx.rank,
        tp_size=spec.tp_size,
        dp_size=spec.dp_size,
        tp_group=dist.group.WORLD,
        attn_tp_group=attn_groups[ctx.dp_rank] if attn_tp > 1 else None,
    )


def validate_model_layout(config: ModelConfig, spec: InstanceSpec, ep_backend: str,
                          eplb: EplbConfig | None = None) -> None:
    """Refuses a layout the model cannot be split over, naming every pair of numbers that clash."""
    if ep_backend not in EP_BACKENDS:
        raise LayoutError(f"unknown --ep-backend {ep_backend!r}; choose one of {EP_BACKENDS}")
    attn_tp, tp = spec.attn_tp_size, spec.tp_size
    clashes = []
    if config.num_attention_heads % attn_tp:
        clashes.append(f"num_attention_heads ({config.num_attention_heads}) is not divisible by attn_tp "
                       f"({attn_tp} = tp {tp} / dp {spec.dp_size})")
    dense = [("intermediate_size", config.intermediate_size)]
    redundant = eplb.num_redundant_experts if eplb is not None else 0
    if eplb is not None and not config.n_routed_experts:
        clashes.append("--enable-eplb needs a model with routed experts")
    if config.n_routed_experts:
        if (config.n_routed_experts + redundant) % tp:
            extra = f" + num_redundant_experts ({redundant})" if redundant else ""
            clashes.append(f"n_routed_experts ({config.n_routed_experts}){extra} is not divisible by tp ({tp}): "
                           "experts are split evenly over every rank")
        if config.n_shared_experts:
            dense.append(("shared experts' intermediate size",
                          config.moe_intermediate_size * config.n_shared_experts))
    for name, size in dense:
        if size % attn_tp:
            clashes.append(f"{name} ({size}) is not divisible by attn_tp ({attn_tp})")
    if ep_backend == "local" and tp > 1:
        clashes.append(f"--ep-backend local holds every expert on one rank, so it needs tp 1 (got tp {tp}); "
                       "use --ep-backend a2a")
    if clashes:
        raise LayoutError("; ".join(clashes))
