"""Router + 1 prefill + 1 decode with MLA-core data parallelism on one side (kvtransfer/README.md): decode
tp2 mla-core (each room's pages received by the one decode rank that owns them, which contacts both
prefill ranks: one real, one dummy) and prefill tp2 mla-core (the room's owner, room % 2, is the only prefill
rank holding the KV and the only source of both decode ranks). Greedy outputs equal colocated generation and
every pool of both sides returns to idle.

By default decode mla-core runs over NIXL and prefill mla-core over Mooncake (each engine and each side once);
TANDEM_PD_FULL_MATRIX=1 runs both sides with both engines.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_system import PAGE_SIZE, PDSystem, check_concurrent_mixed_requests, get_json, skip_unless_backend

from engine.llm import LLM
from engine.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # real processes: router + workers with their ranks

MLA_CORE = ("--tp", "2", "--attention-dp", "mla-core")
LAYOUTS = {
    "P-tp2_to_D-tp2mla": (("--tp", "2"), MLA_CORE),
    "P-tp2mla_to_D-tp2": (MLA_CORE, ("--tp", "2")),
}
if os.environ.get("TANDEM_PD_FULL_MATRIX") == "1":
    CASES = [(layout, kind) for kind in ("nixl", "mooncake") for layout in LAYOUTS]
else:
    CASES = [("P-tp2_to_D-tp2mla", "nixl"), ("P-tp2mla_to_D-tp2", "mooncake")]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("pd-mla-core") / "tiny-v3")


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLM]:
    llm = LLM(tiny_model, page_size=PAGE_SIZE)
    yield llm
    llm.close()


@pytest.fixture(scope="module", params=CASES, ids=lambda p: f"{p[0]}-{p[1]}")
def system(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PDSystem]:
    layout, kind = request.param
    skip_unless_backend(kind)
    prefill_flags, decode_flags = LAYOUTS[layout]
    pd = PDSystem(
        tiny_model,
        tmp_path_factory.mktemp(layout),
        kind,
        prefill_flags=prefill_flags,
        decode_flags=decode_flags,
    )
    yield pd
    pd.close()


def test_mla_core_on_one_side_serves_concurrent_mixed_requests_equal_to_colocated_greedy_outputs(
    system: PDSystem, reference: LLM
) -> None:
    check_concurrent_mixed_requests(system, reference, n=12, seed=3)
    mla_side = system.decode if "--attention-dp" in system.decode_flags else system.prefill
    counts = get_json(mla_side.url + "/server_info")
    # the instance's pages are both ranks' pools: twice one rank's, which holds its own rooms' KV only
    assert counts["total_pages"] == 2 * counts["shard_pages"], counts
