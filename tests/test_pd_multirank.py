"""Router + 1 prefill + 1 decode with mismatched parallel layouts (DESIGN.md rank mapping): P tp2 -> D tp2 dp2
(each decode rank reads from one prefill rank, the real source rotating per room) and P tp2 dp2 -> D tp2
(the room picks P's DP group; both decode ranks read from its one rank). Greedy outputs equal colocated
generation and every pool of both sides returns to idle; the tp2 decode instance also reuses its own pages
across a conversation's turns (decode-side reuse), token-exact.

Four rank processes on 2 cores: by default one engine (NIXL; the tp1 pair covers Mooncake) and 16 requests
per layout; TANDEM_PD_FULL_MATRIX=1 runs every layout with both engines.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_system import (
    PAGE_SIZE,
    PDSystem,
    check_concurrent_mixed_requests,
    check_decode_reuse_across_turns,
    get_json,
    skip_unless_backend,
)

from engine.llm import LLM
from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

# Both decode instances keep finished requests' pages (decode-side reuse). tp2: its two ranks take the same
# cache decisions, and the one prefill rank of the room's group writes each of them only what it lacks. tp2 dp2:
# two groups with a cache each, and rank 0 sends a conversation's turns to the group holding its pages.
REUSE = "--decode-prefix-cache"
LAYOUTS = {
    "P-tp2_to_D-tp2dp2": (("--tp", "2"), ("--tp", "2", "--dp", "2", REUSE)),
    "P-tp2dp2_to_D-tp2": (("--tp", "2", "--dp", "2"), ("--tp", "2", REUSE)),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("pd-model") / "tiny-v3")


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLM]:
    """Colocated generation in this process: what every disaggregated answer must equal."""
    llm = LLM(tiny_model, page_size=PAGE_SIZE)
    yield llm
    llm.close()


BACKENDS = ["nixl", "mooncake"] if os.environ.get("TANDEM_PD_FULL_MATRIX") == "1" else ["nixl"]


@pytest.fixture(
    scope="module",
    params=[(layout, kind) for kind in BACKENDS for layout in LAYOUTS],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def system(
    request: pytest.FixtureRequest,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PDSystem]:
    layout, kind = request.param
    skip_unless_backend(kind)
    prefill_layout, decode_layout = LAYOUTS[layout]
    pd = PDSystem(
        tiny_model,
        tmp_path_factory.mktemp(layout),
        kind,
        prefill_flags=prefill_layout,
        decode_flags=decode_layout,
    )
    yield pd
    pd.close()


def test_mismatched_layouts_serve_concurrent_mixed_requests_equal_to_colocated_greedy_outputs(
    system: PDSystem, reference: LLM
) -> None:
    check_concurrent_mixed_requests(system, reference, n=16, seed=2)
    # A decode instance of several ranks runs expert parallelism in low-latency mode (fixed budgets).
    flags = system.decode_flags
    decode_ranks = int(flags[flags.index("--tp") + 1]) if "--tp" in flags else 1
    assert get_json(system.decode.url + "/server_info")["ep_mode"] == ("low_latency" if decode_ranks > 1 else "local")


def test_a_multi_rank_decode_instance_reuses_its_pages_across_turns_and_is_written_only_the_rest(
    system: PDSystem, tiny_model: Path
) -> None:
    flags = system.decode_flags
    dp = int(flags[flags.index("--dp") + 1]) if "--dp" in flags else 1
    prefill_dp = system.prefill_args[system.prefill_args.index("--dp") + 1] if "--dp" in system.prefill_args else "1"
    # tp2 prefill with dp1: its DP group's two ranks take turns as real sources, its counters are rank 0's.
    check_decode_reuse_across_turns(system, tiny_model, decode_attn_tp=2 // dp, prefill_counts=prefill_dp == "2")
    if dp > 1:
        assert get_json(system.decode.url + "/server_info")["decode_dp_affinity_followed"] > 0
