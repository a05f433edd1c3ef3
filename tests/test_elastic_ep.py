"""``POST /scale_elastic_ep`` on an instance that cannot scale live (no scaler: a prefill instance, several nodes,
one rank): a size the model cannot take is a 400 naming the numbers, the current size a 200, any other size a
501 saying the instance keeps its size; bad bodies are 4xx naming the field. The live path is in
tests/test_elastic_moves.py (the endpoint over a scaler) and tests/test_elastic_scale.py (end to end)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from engine.server.elastic import ElasticLayout, scale_handler

# A decode instance at tp 2 dp 2 of a 14-expert model with 2 redundant EPLB slots.
LAYOUT = ElasticLayout(tp_size=2, dp_size=2, num_experts=14, redundant_experts=2)


async def _post(body: Any, raw: bytes | None = None) -> tuple[int, dict]:
    app = web.Application()
    app.router.add_post("/scale_elastic_ep", scale_handler(LAYOUT))
    async with TestClient(TestServer(app)) as client:
        resp = await (client.post("/scale_elastic_ep", data=raw) if raw is not None
                      else client.post("/scale_elastic_ep", json=body))
        return resp.status, await resp.json()


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"new_data_parallel_size": 2}, 200, "already has this size"),
    ({"new_data_parallel_size": 4}, 501, "keeps serving at data_parallel_size 2"),
    ({"new_data_parallel_size": 3}, 400, "3 is not a power of two"),
    ({"new_data_parallel_size": 32}, 400, "14 + 2 redundant experts do not split evenly over 32 ranks"),
    ({"new_data_parallel_size": 0}, 400, "must be an integer >= 1"),
    ({"new_data_parallel_size": "4"}, 400, "must be an integer >= 1"),
    ({"new_dp": 4}, 400, "unknown field(s) new_dp"),
    ([4], 400, "must be a JSON object"),
])
def test_scale_requests_are_answered_without_disturbing_the_instance(body: Any, status: int, message: str) -> None:
    got_status, got = asyncio.run(_post(body))
    assert got_status == status
    text = got.get("message") or got["error"]["message"]
    assert message in text
    if status >= 400:
        assert got["error"]["param"] in ("new_data_parallel_size", "new_dp", None)


def test_a_body_that_is_not_json_is_a_400() -> None:
    status, got = asyncio.run(_post(None, raw=b"{nope"))
    assert status == 400 and "not valid JSON" in got["error"]["message"]
