"""Keeps the MoE collectives of an instance's ranks in step.

Expert-parallel MoE layers exchange tokens with every rank of the instance, so in each loop turn either
every rank runs one forward or none does. Within an attention-DP group the ranks hold the same requests
and take the same decisions; across groups they differ, so with ``dp_size > 1`` the ranks first agree
(a one-integer all-reduce, like SGLang's gathering of per-DP token counts) whether anyone has work,
and a rank whose scheduler ran no forward runs the MoE layers on an empty batch instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from engine.ep_moe import ExpertParallelMoE
from engine.model import DeepseekForCausalLM
from engine.parallel import ParallelContext
from engine.scheduler import Scheduler, StepResult


class LockstepStepper:
    """Runs ``scheduler.step()`` so that every rank enters the same collectives in the same order.

    Args:
        scheduler: this rank's scheduler (its DP group's requests).
        parallel: this rank's placement.
        moe: the model's expert-parallel MoE (``None`` on one rank: nothing to keep in step).
        control_group: a gloo group for the work flag (``None`` = the default group, fine on CPU).
    """

    def __init__(self, scheduler: Scheduler, model: DeepseekForCausalLM, parallel: ParallelContext,
                 moe: ExpertParallelMoE | None, control_group: Any = None) -> None:
        self.scheduler, self.parallel, self.moe = scheduler, parallel, moe
        self.control_group = control_group
        self.forwards = 0
        self.idle_forwards = 0
        # Counting model calls tells whether the scheduler ran a forward without changing the scheduler.
        self._hook = model.register_forward_pre_hook(self._count_forward)
        self._flag = torch.zeros(1, dtype=torch.int64)

    def _count_forward(self, module: Any, inputs: Any) -> None:
        self.forwards += 1

    def _anyone_has_work(self, mine: bool) -> bool:
        if self.parallel.dp_size == 1 or self.moe is None:
            return mine  # every rank holds the same requests, so they all agree already
        self._flag[0] = int(mine)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(self._flag[0])

    def step(self) -> StepResult:
        mine = self.scheduler.has_work()
        if not self._anyone_has_work(mine):
            return StepResult([], [])
        before = self.forwards
        result = self.scheduler.step() if mine else StepResult([], [])
        if self.moe is not None:
            if self.forwards == before:  # no work here, or waiting for free pages
                self.moe.idle_forward()
                self.idle_forwards += 1
            self.moe.end_step()
        return result

    def close(self) -> None:
        self._hook.remove()
