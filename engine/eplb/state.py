"""EPLB on one rank: the expert map its MoE layers dispatch through, and the rebalance every
``step_interval`` engine steps.

``end_step`` runs on every rank of the instance at the same lockstep turn (``engine.runtime.lockstep``), so
the step counts agree and every collective here (the counts' all-reduce, the weight moves) lines up. The
rebalance runs between two steps: the window's counts are summed over the instance, the policy (a pure,
deterministic function: every rank computes the same placement) places the replicas, weights move rank to
rank, and the map switches before the next step's first dispatch, on every rank.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engine.eplb.config import EplbConfig
from engine.eplb.placement import ExpertMap
from engine.eplb.policy import Placement, balancedness, rebalance_experts
from engine.eplb.rebalance import move_layer
from engine.moe import MoEBlock
from kernels.ep_stats import ExpertLoadRecorder

log = logging.getLogger(__name__)

# Without log_balancedness, /metrics' balancedness is refreshed this often (one small all-reduce).
METRICS_EVERY_STEPS = 32


class EplbState:
    """The expert map, its counters and the rebalance of one rank's model.

    Args:
        config: the instance's ``--eplb-config``.
        blocks: the model's MoE blocks by decoder layer id (their slots already sized for the physical experts).
        recorder: the per-expert token counts (logical ids) of this rank.
        ep_rank / ep_size / group: this rank in the EP group and the group weights move over.
        num_groups / num_nodes: expert groups of the model (group-limited routing) and nodes of the instance.
    """

    def __init__(self, config: EplbConfig, blocks: dict[int, MoEBlock], recorder: ExpertLoadRecorder,
                 ep_rank: int, ep_size: int, group: Any = None, num_groups: int = 1, num_nodes: int = 1) -> None:
        self.config, self.blocks, self.recorder = config, blocks, recorder
        self.ep_rank, self.ep_size, self.group = ep_rank, ep_size, group
        self.num_groups, self.num_nodes = num_groups, num_nodes
        self.layers = sorted(blocks)
        num_logical = recorder.num_experts
        self.num_physical = num_logical + config.num_redundant_experts
        device = recorder.current.device
        self.map = ExpertMap(recorder.num_layers, num_logical, self.num_physical, device)
        self.steps = 0
        self.rebalances = 0
        self.experts_moved = 0  # experts sent rank to rank over the instance, every rebalance together
        self.last_rebalance_s = 0.0
        self.balancedness: float | None = None  # of the current map over the current window
        self.layer_balancedness: list[float] = []
        if config.log_balancedness and not logging.getLogger().handlers and not log.handlers:
            # Rank processes configure no logging (only warnings reach stderr); the user asked for these lines.
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)

    def to_physical(self, layer: int, topk_ids: torch.Tensor, first_row: int) -> torch.Tensor:
        return self.map.to_physical(layer, topk_ids, first_row, self.ep_rank)

    def _window_load(self) -> torch.Tensor:
        """``[MoE layers, E]`` tokens per logical expert over the window, summed over the instance."""
        counts = self.recorder.global_window_counts(self.group)
        return counts[torch.tensor(self.layers, device=counts.device)].cpu()

    def _measure(self, load: torch.Tensor, placement: Placement | None = None) -> tuple[list[float], float]:
        placement = placement or self._current()
        return balancedness(load, placement, self.ep_size)

    def _current(self) -> Placement:
        full = self.map.placement()
        index = torch.tensor(self.layers)
        return Placement(full.phy2log[index], full.log2phy[index], full.logcnt[index])

    def end_step(self) -> None:
        """After the recorder closed the step: rebalance every ``step_interval`` steps, refresh the
        balancedness for /metrics and the log. Every rank calls it at the same turn."""
        self.steps += 1
        cfg = self.config
        if self.steps % cfg.step_interval == 0:
            self.rebalance()
            return
        logging_now = cfg.log_balancedness and self.steps % cfg.log_balancedness_interval == 0
        # Early on at steps 1, 2, 4, 8, 16 so a fresh instance shows a value soon.
        early = self.steps < METRICS_EVERY_STEPS and self.steps & (self.steps - 1) == 0
        if logging_now or early or self.steps % METRICS_EVERY_STEPS == 0:
            self.layer_balancedness, self.balancedness = self._measure(self._window_load())
            if logging_now and self.ep_rank == 0:
                log.info("EPLB step %d: balancedness %.4f (mean / max tokens per rank over the last %d steps)",
                         self.steps, self.balancedness, min(self.steps, self.recorder.window))

    def rebalance(self) -> int:
        """Places the replicas for the window's load, moves the weights and switches the map (a collective).
        Returns how many experts moved between ranks."""
        started = time.perf_counter()
        load = self._window_load()
        _, before = self._measure(load)
        new = rebalance_experts(load, self.num_physical, self.ep_size, self.num_groups, self.num_nodes)
        old = self.map.placement()
        moved = 0
        for row, layer in enumerate(self.layers):
            moved += move_layer(self.blocks[layer], old.phy2log[layer].tolist(), new.phy2log[row].tolist(),
                                   self.ep_rank, self.ep_size, self.group)
        self.map.switch(self.layers, new)
        self.rebalances += 1
        self.experts_moved += moved
        self.layer_balancedness, self.balancedness = self._measure(load, new)
        self.last_rebalance_s = time.perf_counter() - started
        if self.ep_rank == 0:
            log.info("EPLB rebalance %d at step %d: balancedness %.4f -> %.4f over the last %d steps; %d expert(s) "
                     "moved between ranks in %.1f ms", self.rebalances, self.steps, before, self.balancedness,
                     min(self.steps, self.recorder.window), moved, self.last_rebalance_s * 1e3)
        return moved

    def gauges(self) -> dict[str, float]:
        """Instance-wide values for /metrics (the same on every rank)."""
        out: dict[str, float] = {"eplb_rebalances": float(self.rebalances),
                                 "eplb_experts_moved": float(self.experts_moved),
                                 "eplb_last_rebalance_ms": self.last_rebalance_s * 1e3,
                                 "eplb_map_version": float(self.map.version)}
        if self.balancedness is not None:
            out["eplb_balancedness"] = self.balancedness
            for layer, value in zip(self.layers, self.layer_balancedness, strict=True):
                out[f'eplb_layer_balancedness{{layer="{layer}"}}'] = value
        return out
