"""Per-layer per-expert token counts, recorded every step (the input EPLB rebalances from).

Each rank records the routing of the tokens it dispatches itself, so the sum over the ranks of an
instance counts every token exactly once (``global_window_counts`` does that sum). Recording is one
fixed-shape ``scatter_add_`` on the device: no host sync, safe inside a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class ExpertLoadRecorder:
    """Counts of tokens routed to each expert, per MoE layer, over the last ``window`` steps.

    Attributes:
        current: ``[num_layers, num_experts]`` int64, the step being recorded.
        total: the same shape, since construction (or the last ``reset``).
    """

    def __init__(self, num_layers: int, num_experts: int, window: int = 1000,
                 device: torch.device | str = "cpu") -> None:
        if num_layers < 1 or num_experts < 1 or window < 1:
            raise ValueError(f"need num_layers, num_experts, window >= 1; got {num_layers}, {num_experts}, {window}")
        self.num_layers, self.num_experts, self.window = num_layers, num_experts, window
        self.current = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.total = torch.zeros_like(self.current)
        self._ring = torch.zeros(window, num_layers, num_experts, dtype=torch.int64, device=device)
        self.steps = 0

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Adds one layer's routing ``[T, K]`` (global expert ids, ``-1`` = none) to the current step."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers})")
        ids = topk_ids.reshape(-1).long()
        # -1 goes to a spare column that is dropped, so the shape never depends on the data.
        padded = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=self.current.device)
        padded.scatter_add_(0, torch.where(ids >= 0, ids, self.num_experts), torch.ones_like(ids))
        self.current[layer] += padded[: self.num_experts]

    def end_step(self) -> None:
        """Closes the step: its counts enter the window and the total, and ``current`` starts at zero."""
        self._ring[self.steps % self.window].copy_(self.current)
        self.total += self.current
        self.current.zero_()
        self.steps += 1

    def window_counts(self) -> torch.Tensor:
        """``[num_layers, num_experts]`` over the last ``min(steps, window)`` closed steps of this rank."""
        return self._ring.sum(dim=0)

    def global_window_counts(self, group: Any = None) -> torch.Tensor:
        """The window counts summed over every rank of ``group`` (a collective: all ranks call it)."""
        counts = self.window_counts()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        return counts

    def reset(self) -> None:
        self.current.zero_()
        self.total.zero_()
        self._ring.zero_()
        self.steps = 0
