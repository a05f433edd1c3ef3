"""The device half of the overlapped decode schedule (`Scheduler(overlap=True)`).

A synchronous decode turn leaves the GPU idle while the host lays out the next batch, launches it, and reads,
checks and sends the last one's tokens (0.84 ms of a 10.5 ms turn in 1P1D at concurrency 8 on an H100,
`bench.host_path`). Overlapped, the scheduler launches forward N+1 before it reads forward N's tokens: N+1
takes N's tokens as its input ids straight from the device, so nothing waits for the host in between,
and the host's work for N runs while N+1 computes (SGLang's overlap schedule, in one stream).

What makes that exact: only requests without penalties, grammars or log-probabilities take part: their next
token depends on their logits and generator alone, and `engine.sampling.sample_on_device` draws it on the device
exactly as the synchronous `sample` does (the same ops, the same generator, seeded by position); a request that
ends by length is left out of N+1 (the host knows it will); one that ends on a stop token or EOS drew N+1's row
for nothing, and the row is dropped when read. Its pages go back only once no launched forward writes them
(`Scheduler._finish`).

`LaunchedDecode` holds one launched forward: its rows, each row's token on the device, the rows whose draw
raised, and the host copy of tokens and non-finite flags that lands (pinned, one copy) when its event fires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.sampling import sample_on_device

if TYPE_CHECKING:
    from engine.scheduler import Request


@dataclass(eq=False)
class LaunchedDecode:
    reqs: list[Request]
    tokens: torch.Tensor  # [B] int64 on the device: each row's token, the next forward's input
    host: torch.Tensor  # [2, B] int64 on the host (pinned on CUDA): tokens and non-finite flags
    ready: torch.cuda.Event | None  # fires once `host` holds them (None: on CPU, already there)
    draw_errors: dict[int, str] = field(default_factory=dict)  # rows whose draw raised (their token is void)
    row_of: dict[Request, int] = field(default_factory=dict)

    @classmethod
    def read_back(cls, reqs: list[Request], logits: torch.Tensor, positions: list[int]) -> LaunchedDecode:
        """Queue, behind the forward that produced ``logits`` ``[B, V]``, each row's token (drawn as ``sample``
        draws it, output index ``positions[row]``) and whether the row is finite, and their copy to the host.
        Called before the next forward is launched: a CUDA graph's logits are a buffer the next replay
        overwrites."""
        tokens, draw_errors = sample_on_device(logits, [r.params for r in reqs], [r.generator for r in reqs],
                                               positions)
        both = torch.stack((tokens, (~torch.isfinite(logits).all(dim=-1)).long()))
        ready = None
        if logits.is_cuda:
            host = torch.empty(both.shape, dtype=torch.long, pin_memory=True)
            host.copy_(both, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = both
        return cls(reqs, tokens, host, ready, draw_errors, {req: row for row, req in enumerate(reqs)})

    def results(self) -> tuple[list[int], list[bool]]:
        """Each row's token and whether its logits were not finite; waits for the forward on a GPU."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens, bad = self.host.tolist()
        return tokens, [bool(b) for b in bad]

    def feed(self, input_ids: torch.Tensor, src_rows: list[int], dst_rows: list[int]) -> None:
        """Write this forward's tokens of rows ``src_rows`` into ``input_ids[dst_rows]`` on the device (stream
        order: after this forward, before the next). No host sync: the row indices travel pinned."""
        n = len(src_rows)
        if not n:
            return
        if src_rows == dst_rows == list(range(n)):  # the common turn: the same requests, in the same rows
            input_ids[:n].copy_(self.tokens[:n])
            return
        index = torch.tensor(src_rows + dst_rows, dtype=torch.long, pin_memory=input_ids.is_cuda)
        index = index.to(input_ids.device, non_blocking=True)
        input_ids.index_copy_(0, index[n:], self.tokens.index_select(0, index[:n]))
