"""How an instance runs: rank processes (one per GPU, or per CPU rank in tests) and the bridge
between them and the worker's HTTP process.

- `launch`: starts the ranks of an instance, initialises torch.distributed, and tears every rank
  down when one dies (an instance never half-runs).
- `bridge`: the HTTP process's `EngineBackend`: requests go to rank 0 over zmq, token outputs come
  back from each attention-DP group's leader.
- `rank_loop`: the loop every rank runs: rank 0 drains the inbox and broadcasts the step's messages,
  every rank steps its role's `StepRunner`.
- `elastic` / `scaling`: elastic EP, the ranks' and the HTTP process's sides: a running decode instance
  grows or shrinks by whole DP groups, re-forming its world between two turns.
"""
