"""EPLB on real rank processes (CPU, gloo, float32, the tiny v3-eplb checkpoint: 14 experts in 2 groups):
greedy tokens are the single-rank ones with EPLB off, on (2 redundant experts, tokens spread over replicas)
and across live rebalances forced every few steps in the middle of generation (weights moved rank to rank,
the map switched on every rank at the same step); the balancedness reaches the instance's status, and pools
end idle. Plus the ``--eplb-config`` flags."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from engine.eplb.config import EplbConfig, add_eplb_flags, eplb_config_from_flags
from engine.llm import LLM
from engine.runtime.bridge import RankBridge
from engine.runtime.colocated import EngineArgs, colocated_entry
from engine.runtime.launch import InstanceSpec, LayoutError, ipc_addr, launch
from engine.runtime.offline import check_layout
from engine.sampling import SamplingParams
from engine.server.messages import GenerateRequest, SamplingSpec
from engine.tiny_model import write_tiny_model

PAGE_SIZE = 16
PROMPTS = [[10, 11, 12, 13, 14, 15, 16], [40, 41], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [3],
           [200, 201, 202, 203], [90, 91, 92, 93, 94, 95]]
MAX_NEW = [12, 5, 10, 12, 4, 9]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("eplb"), "v3-eplb", seed=0)


@pytest.fixture(scope="module")
def single_rank_tokens(model: Path) -> list[list[int]]:
    llm = LLM(str(model), page_size=PAGE_SIZE, num_pages=64)
    try:
        params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in MAX_NEW]
        return [o.token_ids for o in llm.generate(PROMPTS, params)]
    finally:
        llm.close()


async def _run_instance(spec: InstanceSpec, args: EngineArgs) -> tuple[list[list[int]], dict]:
    """Every prompt at once through the rank runtime; the tokens, then the instance's status once idle."""
    inbox, outbox = ipc_addr("in"), ipc_addr("out")
    bridge = RankBridge(inbox, outbox, num_dp_groups=spec.dp_size)
    loop = asyncio.get_running_loop()
    procs = launch(spec, colocated_entry, inbox, outbox, {"engine": args},
                   on_death=lambda reason: loop.call_soon_threadsafe(bridge.fail_all, reason))
    bridge.start()

    async def one(i: int) -> list[int]:
        tokens: list[int] = []
        sampling = SamplingSpec(max_new_tokens=MAX_NEW[i], ignore_eos=True)
        async for out in bridge.submit(GenerateRequest(rid=f"r{i}", input_ids=PROMPTS[i], sampling=sampling)):
            assert out.error is None, out.error
            tokens.extend(out.token_ids)
        return tokens

    try:
        tokens = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(PROMPTS)))), 240)
        while True:  # every DP group's pool back at its idle count, in a report sent after the last request
            info = bridge.info()
            statuses = list(bridge.group_status.values())
            if len(statuses) == spec.dp_size and all(
                    s.counts["free_pages"] + s.counts["evictable_pages"] == s.counts["total_pages"] for s in statuses):
                return tokens, info
            await asyncio.sleep(0.2)
    finally:
        procs.stop()
        bridge.close()


def _args(model: Path, eplb: EplbConfig | None, ep_mode: str = "high_throughput") -> EngineArgs:
    return EngineArgs(model_dir=str(model), page_size=PAGE_SIZE, num_pages=64, max_prefill_tokens=64,
                      ep_mode=ep_mode, eplb=eplb)


@pytest.mark.parametrize(("tp", "dp", "eplb", "ep_mode"), [
    (2, 2, None, "high_throughput"),
    # 2 redundant experts: 16 slots over 4 ranks; no rebalance within the run (the start-up map's replicas)
    (4, 2, EplbConfig(num_redundant_experts=2), "high_throughput"),
    # Forced rebalances every 3 steps over a 4-step window, decode's low-latency dispatch
    (4, 2, EplbConfig(num_redundant_experts=2, step_interval=3, window_size=4, log_balancedness=True), "low_latency"),
], ids=["off-tp2-dp2", "on-tp4-dp2", "rebalancing-tp4-dp2"])
def test_greedy_tokens_equal_the_single_rank_run_with_eplb_off_on_and_across_live_rebalances(
        tp: int, dp: int, eplb: EplbConfig | None, ep_mode: str, model: Path,
        single_rank_tokens: list[list[int]]) -> None:
    tokens, info = asyncio.run(_run_instance(InstanceSpec(tp_size=tp, dp_size=dp), _args(model, eplb, ep_mode)))
    assert tokens == single_rank_tokens
    if eplb is None:
        assert "eplb_rebalances" not in info
        return
    assert 0 < info["eplb_balancedness"] <= 1
    assert {f'eplb_layer_balancedness{{layer="{layer}"}}' for layer in (1, 2)} <= set(info)
    if eplb.step_interval == 3:
        # max 12 new tokens: a dozen engine steps, so several rebalances ran mid-generation and moved weights
        assert info["eplb_rebalances"] >= 2 and info["eplb_map_version"] == info["eplb_rebalances"]
        assert info["eplb_experts_moved"] > 0
    else:
        assert info["eplb_rebalances"] == 0


def _flags(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eplb_flags(parser)
    return parser.parse_args(argv)


def test_eplb_flags_take_vllms_keys_and_defaults_json_and_dotted() -> None:
    assert eplb_config_from_flags(_flags([])) is None
    assert eplb_config_from_flags(_flags(["--enable-eplb"])) == EplbConfig(
        window_size=1000, step_interval=3000, num_redundant_experts=0, log_balancedness=False, policy="default")
    got = eplb_config_from_flags(_flags(["--enable-eplb", "--eplb-config",
                                         '{"window_size": 10, "num_redundant_experts": 4, "use_async": false}',
                                         "--eplb-config.num_redundant_experts", "2",
                                         "--eplb-config.log_balancedness", "true"]))
    assert got == EplbConfig(window_size=10, num_redundant_experts=2, log_balancedness=True)


@pytest.mark.parametrize(("argv", "message"), [
    (["--eplb-config", '{"window_size": 5}'], r"\(window_size\) were given without --enable-eplb"),
    (["--enable-eplb", "--eplb-config", "[1]"], "must be a JSON object"),
    (["--enable-eplb", "--eplb-config", "{bad"], "not valid JSON"),
    (["--enable-eplb", "--eplb-config", '{"window": 3}'], "has no key 'window'"),
    (["--enable-eplb", "--eplb-config", '{"use_async": true}'], "use_async=True is not supported"),
    (["--enable-eplb", "--eplb-config.step_interval", "0"], "step_interval must be an integer >= 1"),
    (["--enable-eplb", "--eplb-config.num_redundant_experts", "-1"], "num_redundant_experts must be an integer"),
    (["--enable-eplb", "--eplb-config.policy", "random"], "policy 'random' is not known"),
])
def test_bad_eplb_settings_are_refused_naming_the_key(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        eplb_config_from_flags(_flags(argv))


def test_redundant_experts_that_do_not_split_over_the_ranks_are_refused_before_start(model: Path) -> None:
    with pytest.raises(LayoutError, match=r"n_routed_experts \(14\) \+ num_redundant_experts \(1\) is not divisible "
                                          r"by tp \(4\)"):
        check_layout(InstanceSpec(tp_size=4, dp_size=2), _args(model, EplbConfig(num_redundant_experts=1)))
