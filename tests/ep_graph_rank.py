"""A colocated rank that decodes through the CUDA-graph runner (``engine.cuda_graph``), for
tests/test_ep_graphs.py. On CPU the runner replays nothing: it runs the same padded, graph-safe forward
eagerly, so the test checks exactly what a GPU graph would hold. After every step the rank writes its
counts (batches through the static path, batches eager, idle forwards) to ``$EP_GRAPH_REPORT_DIR``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from decode_worker.prefilled import attach_cuda_graphs
from engine.runtime.colocated import ColocatedRunner, EngineArgs, RankEngine, build_rank_engine
from engine.runtime.launch import RankContext
from engine.runtime.rank_loop import run_rank
from engine.server.messages import TokenOutput

REPORT_DIR_ENV = "EP_GRAPH_REPORT_DIR"


class GraphColocatedRunner(ColocatedRunner):
    def __init__(self, ctx: RankContext, engine: RankEngine, args: EngineArgs) -> None:
        super().__init__(engine, args)
        graphs = attach_cuda_graphs(ctx, engine, self, args.cuda_graph_max_bs)
        if graphs is None:
            raise RuntimeError("the graph runner refused this model (see the warning above)")
        self.graphs = graphs
        self.report = Path(os.environ[REPORT_DIR_ENV]) / f"rank{ctx.rank}.json"

    def step(self) -> list[TokenOutput]:
        outs = super().step()
        counts = {"static_steps": self.graphs.static_steps, "eager_steps": self.graphs.eager_steps,
                  "idle_forwards": self.stepper.idle_forwards, "budget": self.engine.moe.ep.budget
                  if self.engine.moe is not None else 0}
        # Whole or not at all: the instance is stopped (its ranks terminated) as soon as the last token is out.
        partial = self.report.with_suffix(".tmp")
        partial.write_text(json.dumps(counts))
        os.replace(partial, self.report)
        return outs

    def close(self) -> None:
        self.graphs.close()  # returns its scratch page before the pool goes
        super().close()


def graph_colocated_entry(ctx: RankContext) -> None:
    args: EngineArgs = ctx.role_args["engine"]
    engine = build_rank_engine(ctx, args)
    run_rank(ctx, GraphColocatedRunner(ctx, engine, args))
