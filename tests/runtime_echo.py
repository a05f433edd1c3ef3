"""A scripted StepRunner for runtime tests (the far side of the rank loop): each step emits one
token per request, the token being the request's DP rank * 1000 + its position."""

from __future__ import annotations

from engine.runtime.launch import RankContext
from engine.runtime.rank_loop import StepRunner, named_or_least_loaded, run_rank
from engine.server.messages import GenerateRequest, TokenOutput


class EchoRunner(StepRunner):
    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.active: dict[str, tuple[GenerateRequest, int]] = {}

    def add(self, request: GenerateRequest) -> None:
        self.active[request.rid] = (request, 0)

    def abort(self, rid: str) -> list[TokenOutput]:
        if self.active.pop(rid, None) is None:
            return []
        return [TokenOutput(rid=rid, token_ids=[], finished=True, finish_reason="abort")]

    def num_requests(self) -> int:
        return len(self.active)

    def step(self) -> list[TokenOutput]:
        outs = []
        for rid, (req, n) in list(self.active.items()):
            done = n + 1 >= req.sampling.max_new_tokens
            outs.append(TokenOutput(rid=rid, token_ids=[self.ctx.dp_rank * 1000 + n], finished=done,
                                    finish_reason="length" if done else None))
            if done:
                del self.active[rid]
            else:
                self.active[rid] = (req, n + 1)
        return outs

    def choose_dp_rank(self, request: GenerateRequest, loads: list[int]) -> int:
        return named_or_least_loaded(request, loads)

    def status_counts(self) -> dict[str, int]:
        return {"echo_active": len(self.active)}

    def close(self) -> None:
        self.active.clear()


def echo_entry(ctx: RankContext) -> None:
    run_rank(ctx, EchoRunner(ctx))
