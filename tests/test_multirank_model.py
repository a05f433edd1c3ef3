"""Multi-rank instances of the tiny checkpoints on CPU/gloo/float32: TP, DP attention and expert-parallel
MoE give the single-rank greedy tokens; bad layouts are refused before anything starts; a dead rank
ends the instance with a clear error. Real rank processes, real gloo groups, real zmq."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig
from engine.ep_moe import ExpertParallelMoE
from engine.generate import main as generate_main
from engine.llm import LLM
from engine.runtime.bridge import RankBridge
from engine.runtime.colocated import EngineArgs, colocated_entry
from engine.runtime.groups import resolve_ep_backend, validate_model_layout
from engine.runtime.launch import (
    InstanceProcesses,
    InstanceSpec,
    LayoutError,
    free_port_run,
    ipc_addr,
    launch,
)
from engine.runtime.offline import generate_on_ranks
from engine.sampling import SamplingParams
from engine.server.messages import GenerateRequest, SamplingSpec
from engine.tiny_model import write_tiny_model

PAGE_SIZE = 16
# Uneven prompts and lengths: DP groups get different batch sizes and finish at different steps, so
# some groups run idle forwards while others still decode.
PROMPTS = [[10, 11, 12, 13, 14, 15, 16], [40, 41], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [3],
           [200, 201, 202, 203], [90, 91, 92, 93, 94, 95]]
PARAMS = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (8, 3, 6, 8, 2, 5)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multirank")
    return {variant: write_tiny_model(root / variant, variant, seed=0) for variant in ("v3", "v2-lite")}


@pytest.fixture(scope="module")
def single_rank_tokens(models: dict[str, Path]) -> dict[str, list[list[int]]]:
    tokens = {}
    for variant, path in models.items():
        llm = LLM(str(path), page_size=PAGE_SIZE, num_pages=64)
        try:
            tokens[variant] = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
        finally:
            llm.close()
    return tokens


def _engine_args(path: Path, ep_mode: str = "high_throughput") -> EngineArgs:
    # max_prefill_tokens small enough that low-latency mode's fixed buffers stay small, large enough
    # that all prompts of a DP group prefill in one forward.
    return EngineArgs(model_dir=str(path), page_size=PAGE_SIZE, num_pages=64, max_prefill_tokens=64,
                      ep_mode=ep_mode)


@pytest.mark.parametrize(("tp", "dp", "variant", "ep_mode"), [
    (4, 1, "v3", "high_throughput"),
    (4, 2, "v2-lite", "low_latency"),
    (4, 4, "v3", "high_throughput"),
])
def test_multi_rank_greedy_tokens_equal_the_single_rank_run(tp: int, dp: int, variant: str, ep_mode: str,
                                                            models: dict[str, Path],
                                                            single_rank_tokens: dict[str, list[list[int]]]) -> None:
    outputs = generate_on_ranks(InstanceSpec(tp_size=tp, dp_size=dp), _engine_args(models[variant], ep_mode),
                                PROMPTS, PARAMS, timeout_s=240)
    assert [o.token_ids for o in outputs] == single_rank_tokens[variant]
    assert all(o.finish_reason == "length" for o in outputs)


def test_generate_cli_with_tp2_prints_the_single_rank_tokens_in_prompt_order(
        models: dict[str, Path], single_rank_tokens: dict[str, list[list[int]]]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", str(models["v3"]), "--prompt-token-ids",
         json.dumps(PROMPTS[:2]), "--max-new-tokens", "3", "--ignore-eos", "--json", "--page-size", str(PAGE_SIZE),
         "--num-pages", "64", "--tp", "2", "--ep-backend", "a2a"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    outputs = json.loads(proc.stdout)["outputs"]
    assert [o["token_ids"] for o in outputs] == [t[:3] for t in single_rank_tokens["v3"][:2]]


def test_two_nodes_on_one_machine_form_one_tp2_instance_with_the_single_rank_tokens(
        models: dict[str, Path], single_rank_tokens: dict[str, list[list[int]]]) -> None:
    addr = f"127.0.0.1:{free_port_run(3)}"  # zmq takes the next two (engine.server.serve.zmq_addresses)
    node_flags = ["--tp", "2", "--nnodes", "2", "--dist-init-addr", addr, "--page-size", str(PAGE_SIZE)]
    headless = subprocess.Popen(
        [sys.executable, "-m", "engine.generate", "--model", str(models["v3"]), "--prompt-token-ids", "[[1]]",
         "--node-rank", "1", *node_flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        spec = InstanceSpec(tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr)
        outputs = generate_on_ranks(spec, _engine_args(models["v3"]), PROMPTS[:3], PARAMS[:3], timeout_s=240)
        _, err = headless.communicate(timeout=60)
    finally:
        headless.kill()
        headless.wait()
    assert [o.token_ids for o in outputs] == single_rank_tokens["v3"][:3]
    assert headless.returncode == 0, err
    assert "node 1: ranks ended" in err


# ---- one tp=2, dp=2 instance shared by the tests below (the last one kills a rank) -----------------

class RunningInstance:
    def __init__(self, spec: InstanceSpec, args: EngineArgs) -> None:
        self.loop = asyncio.new_event_loop()
        self.inbox, self.outbox = ipc_addr("in"), ipc_addr("out")
        self.bridge = RankBridge(self.inbox, self.outbox, num_dp_groups=spec.dp_size)
        self.died = asyncio.Event()
        self.death_reason: str | None = None
        self.procs: InstanceProcesses = launch(spec, colocated_entry, self.inbox, self.outbox, {"engine": args},
                                               on_death=self._on_death)

    def _on_death(self, reason: str) -> None:  # the launcher's watcher thread
        self.death_reason = reason
        self.loop.call_soon_threadsafe(self.bridge.fail_all, reason)
        self.loop.call_soon_threadsafe(self.died.set)

    async def collect(self, rid: str, prompt: list[int], params: SamplingParams) -> tuple[list[int], str | None]:
        spec = SamplingSpec(max_new_tokens=params.max_new_tokens, ignore_eos=params.ignore_eos)
        tokens: list[int] = []
        async for out in self.bridge.submit(GenerateRequest(rid=rid, input_ids=prompt, sampling=spec)):
            tokens.extend(out.token_ids)
            if out.finished:
                return tokens, out.error
        return tokens, "stream ended"

    def run(self, coro, timeout: float):  # noqa: ANN001, ANN201
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self) -> None:
        self.procs.stop()
        self.bridge.close()
        self.loop.close()


@pytest.fixture(scope="module")
def tp2_dp2(models: dict[str, Path]) -> Iterator[RunningInstance]:
    instance = RunningInstance(InstanceSpec(tp_size=2, dp_size=2), _engine_args(models["v3"]))
    yield instance
    instance.close()


def test_tp2_dp2_spreads_requests_over_both_groups_and_matches_the_single_rank_tokens(
        tp2_dp2: RunningInstance, single_rank_tokens: dict[str, list[list[int]]]) -> None:
    async def all_prompts() -> list[tuple[list[int], str | None]]:
        return await asyncio.gather(*(tp2_dp2.collect(f"p{i}", p, PARAMS[i]) for i, p in enumerate(PROMPTS)))

    results = tp2_dp2.run(all_prompts(), 240)
    assert [error for _, error in results] == [None] * len(PROMPTS)
    assert [tokens for tokens, _ in results] == single_rank_tokens["v3"]
    # Both DP leaders reported, and each group's pool is back at its idle count.
    tp2_dp2.run(_wait_for_idle_pools(tp2_dp2.bridge), 30)


async def _wait_for_idle_pools(bridge: RankBridge) -> None:
    while True:
        statuses = list(bridge.group_status.values())
        if len(statuses) == 2 and all(s.counts["free_pages"] + s.counts["evictable_pages"] == s.counts["total_pages"]
                                      for s in statuses):
            return
        await asyncio.sleep(0.2)


def test_a_dead_rank_ends_a_model_instance_with_a_clear_error_within_30s(tp2_dp2: RunningInstance) -> None:
    async def kill_mid_generation() -> tuple[list[int], str | None]:
        task = asyncio.create_task(tp2_dp2.collect("victim", PROMPTS[0], SamplingParams(max_new_tokens=400,
                                                                                          ignore_eos=True)))
        await asyncio.sleep(1.0)
        os.kill(tp2_dp2.procs._procs[1].pid, signal.SIGKILL)
        return await task

    started = time.monotonic()
    tokens, error = tp2_dp2.run(kill_mid_generation(), 60)
    assert time.monotonic() - started < 31
    assert error is not None and "rank1" in error and "-9" in error, error
    assert len(tokens) < 400
    assert not tp2_dp2.procs.alive


# ---- refused before anything starts -----------------------------------------------------------------

def test_layouts_the_model_cannot_be_split_over_are_refused_naming_the_numbers(models: dict[str, Path]) -> None:
    config = ModelConfig.from_dir(models["v3"])  # 4 heads, 8 experts, intermediate 128, shared 32
    with pytest.raises(LayoutError, match=r"num_attention_heads \(4\) is not divisible by attn_tp \(8 = tp 8 / dp 1\)"):
        validate_model_layout(config, InstanceSpec(tp_size=8), "a2a")
    with pytest.raises(LayoutError, match=r"n_routed_experts \(8\) is not divisible by tp \(16\)"):
        validate_model_layout(config, InstanceSpec(tp_size=16, dp_size=16), "a2a")
    with pytest.raises(LayoutError) as refused:
        validate_model_layout(config, InstanceSpec(tp_size=3), "a2a")
    for clash in ("num_attention_heads (4)", "n_routed_experts (8)", "intermediate_size (128)",
                  "shared experts' intermediate size (32)"):
        assert clash in str(refused.value)
    with pytest.raises(LayoutError, match=r"--ep-backend local holds every expert on one rank, so it needs tp 1"):
        validate_model_layout(config, InstanceSpec(tp_size=2), "local")
    with pytest.raises(LayoutError, match="--ep-backend deepep cannot run here: DeepEP runs on CUDA GPUs only"):
        resolve_ep_backend("deepep", InstanceSpec(tp_size=2))
    assert resolve_ep_backend("auto", InstanceSpec(tp_size=2)) == "a2a"
    assert resolve_ep_backend("auto", InstanceSpec()) == "local"


@pytest.mark.parametrize(("flags", "message"), [
    (["--tp", "3", "--dp", "2"], "tp (3) is not divisible by dp (2)"),
    (["--tp", "8"], "num_attention_heads (4) is not divisible by attn_tp (8 = tp 8 / dp 1)"),
    (["--tp", "2", "--nnodes", "2"], "--dist-init-addr is required with more than one node"),
])
def test_generate_cli_refuses_a_bad_layout_before_spawning_ranks(flags: list[str], message: str,
                                                                 models: dict[str, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc = generate_main(["--model", str(models["v3"]), "--prompt-token-ids", "[[1, 2]]", *flags])
    assert rc == 2
    assert message in capsys.readouterr().err


# ---- expert parallelism in one process ----------------------------------------------------------------

def test_local_expert_parallel_moe_gives_the_same_tokens_and_counts_every_routed_token(
        models: dict[str, Path], single_rank_tokens: dict[str, list[list[int]]]) -> None:
    llm = LLM(str(models["v3"]), page_size=PAGE_SIZE, num_pages=64)
    moe = ExpertParallelMoE(llm.model, backend="local")
    forwards = []
    llm.model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].input_ids.numel()))
    try:
        tokens = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
        moe.end_step()
    finally:
        moe.close()
        llm.close()
    assert tokens == single_rank_tokens["v3"]
    config = llm.config
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    counts = moe.recorder.total
    for layer in range(config.num_hidden_layers):
        expected = sum(forwards) * config.num_experts_per_tok if layer in moe_layers else 0
        assert int(counts[layer].sum()) == expected
    assert torch.all(counts >= 0)


def test_ranks_of_an_attention_group_take_the_same_prefix_cache_decisions(models: dict[str, Path]) -> None:
    """tp=2 (one attention-TP group): one request at a time, so each later prompt hits the pages of the
    shared prefix. Both ranks run their own cache over their own pool; a rank that hit where its peer did
    not would run a forward of another shape and the TP collectives would fail or give other tokens."""
    shared = [(5 * i + 3) % 200 for i in range(3 * PAGE_SIZE + 4)]
    prompts = [shared + [i + 1] * (2 + 7 * i) for i in range(4)]
    params = [SamplingParams(max_new_tokens=4, ignore_eos=True)] * len(prompts)
    llm = LLM(str(models["v3"]), page_size=PAGE_SIZE, num_pages=64, prefix_cache=False)
    try:
        expected = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.close()
    args = EngineArgs(model_dir=str(models["v3"]), page_size=PAGE_SIZE, num_pages=64, max_prefill_tokens=64,
                      max_running=1)
    outputs = generate_on_ranks(InstanceSpec(tp_size=2), args, prompts, params, timeout_s=240)
    assert [o.token_ids for o in outputs] == expected
    # The first computes the shared pages; each later one finds its 3 full pages cached.
    assert sorted(o.cached_tokens or 0 for o in outputs) == [0] + [3 * PAGE_SIZE] * 3


def test_ranks_of_an_attention_group_retract_the_same_requests(models: dict[str, Path]) -> None:
    """tp=2 with `reserve_tokens` and a pool the requests outgrow: retraction decisions depend only on the
    group's shared state, so both ranks retract alike and the tokens are the uninterrupted run's. (The same
    load on one rank does retract, checked first.)"""
    prompts = [[(7 * i + 5 * j) % 200 + 2 for j in range(20 + 5 * i)] for i in range(4)]
    params = [SamplingParams(max_new_tokens=30, ignore_eos=True)] * len(prompts)
    reference = LLM(str(models["v3"]), page_size=PAGE_SIZE, num_pages=64, prefix_cache=False)
    small = LLM(str(models["v3"]), page_size=PAGE_SIZE, num_pages=8, reserve_tokens=4)
    try:
        expected = [o.token_ids for o in reference.generate(prompts, params)]
        assert [o.token_ids for o in small.generate(prompts, params)] == expected
        assert small.scheduler.retractions > 0
    finally:
        reference.close()
        small.close()
    args = EngineArgs(model_dir=str(models["v3"]), page_size=PAGE_SIZE, num_pages=8, max_prefill_tokens=64,
                      reserve_tokens=4)
    outputs = generate_on_ranks(InstanceSpec(tp_size=2), args, prompts, params, timeout_s=240)
    assert [o.token_ids for o in outputs] == expected
