"""Prefill first on a shared GPU (`engine.prefill_turn`): the flag between two real processes, the prefill batcher
holding it for exactly its forwards, and a decode worker pausing while it is held (the system test lives with
the 1P1D system of tests/test_pd_tp1.py, whose Mooncake pair runs with the flag on)."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.synchronize
import struct
import time
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.forward_batch import ForwardBatch, ForwardOutput
from engine.kv_pool import KVPool
from engine.model import DeepseekForCausalLM
from engine.prefill_turn import STALE_S, PrefillTurn
from engine.sampling import SamplingParams
from engine.tiny_model import write_tiny_model
from engine.weights import load_model
from prefill_worker.batcher import PrefillBatcher, PrefillJob


def _hold(path: str, seconds: float, held: mp.synchronize.Event) -> None:
    turn = PrefillTurn(path)
    with turn.running():
        held.set()
        time.sleep(seconds)
    turn.close()


def test_a_waiter_in_another_process_resumes_when_the_turn_is_given_back(tmp_path: Path) -> None:
    path = str(tmp_path / "turn")
    waiter = PrefillTurn(path)
    assert not waiter.busy() and waiter.wait() < 0.05  # nobody holds it: no wait
    ctx = mp.get_context("spawn")
    held = ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, 0.6, held))
    holder.start()
    try:
        assert held.wait(60)
        assert waiter.busy()
        waited = waiter.wait()
        assert 0.4 <= waited < 5, waited
        assert not waiter.busy()
    finally:
        holder.join(30)
        waiter.close()
    assert holder.exitcode == 0


def test_a_turn_left_held_by_a_dead_holder_stops_counting_after_stale_s(tmp_path: Path) -> None:
    path = tmp_path / "turn"
    turn = PrefillTurn(path)
    with path.open("r+b") as f:  # what a holder killed mid-forward leaves: a start time and no release
        f.write(struct.pack("d", time.monotonic() - STALE_S - 0.5))
    assert not turn.busy() and turn.wait() < 0.05
    with path.open("r+b") as f:
        f.write(struct.pack("d", time.monotonic() - 0.1))
    assert turn.busy()
    turn.close()


class _Watched(torch.nn.Module):
    """The model, noting at each forward whether the turn is held (seen through a second mapping of its file)."""

    def __init__(self, model: DeepseekForCausalLM, observer: PrefillTurn) -> None:
        super().__init__()
        self.model, self.observer, self.seen = model, observer, []
        self.config = model.config

    def forward(self, batch: ForwardBatch) -> ForwardOutput:
        self.seen.append(self.observer.busy())
        return self.model(batch)


def test_the_prefill_batcher_holds_the_turn_for_each_forward_and_only_then(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "tiny", "v3", seed=3)
    config = ModelConfig.from_dir(model_dir)
    model = DeepseekForCausalLM(config, dtype=torch.float32, device="cpu")
    load_model(model, model_dir)
    pool = KVPool(16, config.num_hidden_layers, 16, config.kv_cache_dim, torch.float32, "cpu")
    path = tmp_path / "turn"
    turn, observer = PrefillTurn(path), PrefillTurn(path)
    watched = _Watched(model, observer)
    batcher = PrefillBatcher(watched, pool, max_prefill_tokens=32, max_running=4, turn=turn)  # type: ignore[arg-type]
    job = PrefillJob("r", [(7 * i + 3) % 200 for i in range(70)], SamplingParams(temperature=0.0))
    batcher.add(job)
    forwards = 0
    while not job.prefilled:  # 70 tokens: chunks of 32, 32 and 6
        assert not observer.busy()  # between forwards a decode instance may run
        forwards += bool(batcher.step())
    assert watched.seen == [True, True, True] and forwards == 3
    assert not observer.busy() and job.first_token is not None
    batcher.release(job)
    turn.close()
    observer.close()
