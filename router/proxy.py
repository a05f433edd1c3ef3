"""The request path: pick a (prefill, decode) pair, send to both at once, stream decode's answer back.

Order of events for one PD request: the prefill request starts in its own task; the decode request
runs in the handler, which waits for decode's first body bytes before answering the client. Until
then nothing is committed, so a prefill error that arrives first is returned to the client (and the
decode side aborted), and a worker that cannot be reached is replaced by another (retry). From the
first byte on, decode's bytes go to the client as they come (through `router.answers`, which puts the
client's ids back and turns an aborted or empty answer into an error). If the client goes away, both
sides are aborted: their connections are closed and `/abort_request` names the request's rid. When
decode fails (an error status, an error or abort inside its 200, a cut stream), prefill is aborted too,
so it does not hold the room's pages until its own timeout.

Each attempt has its own worker-side rid (`answers.new_request_id`): an abort sent for one attempt can
never reach another request, whatever ids the client reuses.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

import orjson

from kvtransfer.protocol import DATA_PARALLEL_RANK, DISAGG_PREFILL_DP_RANK, KV_REUSED_HEADER
from router.answers import IdRewriter, StreamGuard, failure_event, new_request_id, whole_answer_failure
from router.config import Role
from router.dp_routing import Charge, output_budget, requested_dp_rank
from router.errors import RouterError, error_body, is_openai_error
from router.http_server import HttpConnection
from router.inbound import InboundRequest, Kind, abort_rids, client_ids, worker_body
from router.upstream import StaleConnection, UpstreamConnection, UpstreamError, UpstreamTimeout, build_request

if TYPE_CHECKING:
    from router.policies import Expectation
    from router.state import RouterState
    from router.workers import Worker

log = logging.getLogger("router.proxy")
_RETRY_STATUSES = (502, 503, 504)
# How long a decode answer of a failed KV transfer waits for prefill's own answer to the same request: prefill
# answers in the turn it fails a room, so its reason (a fault of that request) is there within milliseconds.
PREFILL_VERDICT_S = 0.25
_ROOM_BITS = 63
_CLIENT_HIGH_WATER = 1 << 20  # bytes queued for a client before relaying pauses
_CLIENT_LOW_WATER = 256 << 10


# Decode-side reuse: a decode worker's answer says "<prompt tokens whose KV it held already>/<prompt tokens>";
# the cache-aware decode choice learns from it. Header names are lower-cased by the head parser.
_KV_REUSED_HEADER = KV_REUSED_HEADER.lower()


def _reuse_report(conn: UpstreamConnection) -> tuple[int, int] | None:
    """(reused, prompt) tokens from a decode answer's reuse header, or None (absent or malformed)."""
    value = conn.headers.get(_KV_REUSED_HEADER)
    if value is None:
        return None
    reused, _, prompt = value.partition("/")
    return (int(reused), int(prompt)) if reused.isdigit() and prompt.isdigit() else None


def _int_after(body: bytes, key: bytes) -> int | None:
    """The integer right after the first `key` in a compact JSON body (orjson writes no spaces), or None."""
    start = body.find(key)
    if start < 0:
        return None
    start += len(key)
    end = start
    while end < len(body) and 48 <= body[end] <= 57:
        end += 1
    return int(body[start:end]) if end > start else None


class PrefillFailed(UpstreamError):
    """Prefill answered with an error status before decode sent anything: the client gets it."""

    def __init__(self, status: int, body: bytes, content_type: bytes) -> None:
        super().__init__(f"prefill answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


class PrefillUnreachable(UpstreamError):
    """Prefill could not be reached or broke off: the pair is retried with another prefill."""


class _Retry(Exception):
    def __init__(self, worker: Worker, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.worker = worker
        self.cause = cause


class PrefillJob:
    """The prefill half of a PD request, sent beside the decode half.

    With a kept-alive connection at hand (the common case) the request is written at once and its
    answer handled in protocol callbacks: no task, no future. Only a new connection (or a resend
    after a stale keep-alive one) needs a task to wait for the connect.
    """

    def __init__(self, state: RouterState, worker: Worker, request: bytes, deadline: float, rids: list[str],
                 expected: Expectation | None = None, charge: Charge | None = None):
        self._state = state
        self._charge = charge  # the prefill DP group's load this request adds, until prefill answers
        self.worker = worker
        self._expected = expected  # checked against the worker's hit report (`cached_tokens`) in its answer
        self._request = request
        self._deadline = deadline
        self._rids = rids
        self.failure: UpstreamError | None = None
        self._decode_conn: UpstreamConnection | None = None
        self._decode_exchange = 0
        self.committed = False  # decode's bytes reached the client: prefill errors no longer matter
        self._done = False
        self._conn: UpstreamConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._resent = False
        self._epoch = worker.failure_epoch
        self._answered = asyncio.Event()  # set once prefill answered (or the job was aborted)
        worker.in_flight += 1
        worker.stats.requests += 1
        conn = state.pool.take_idle(worker.host, worker.port)
        if conn is not None:
            self._send_on(conn)
        else:
            self._connect_in_task(fresh=False)

    def watch(self, conn: UpstreamConnection) -> None:
        """`on_connection` hook of the decode request: lets a prefill failure abort decode's wait."""
        if self.failure is not None:
            raise self.failure
        self._decode_conn = conn
        self._decode_exchange = conn.exchange + 1  # the exchange about to be sent on it

    async def verdict(self, within_s: float) -> PrefillFailed | None:
        """Prefill's error answer to this request once it has come (waiting at most ``within_s``), else None."""
        if not self._answered.is_set():
            try:
                await asyncio.wait_for(self._answered.wait(), within_s)
            except asyncio.TimeoutError:
                pass
        return self.failure if isinstance(self.failure, PrefillFailed) else None

    def _send_on(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        try:
            conn.send_sink(self._request, self._deadline, self._on_answer)
        except StaleConnection as exc:
            conn.close()
            self._on_answer(0, b"", b"", exc)

    def _connect_in_task(self, fresh: bool) -> None:
        self._task = asyncio.get_running_loop().create_task(self._connect_then_send(fresh))

    async def _connect_then_send(self, fresh: bool) -> None:
        w = self.worker
        try:
            conn = await self._state.pool.connect(w.host, w.port, fresh=fresh)
        except UpstreamError as exc:
            self._on_answer(0, b"", b"", exc)
            return
        if self._done:  # aborted while connecting: the unused connection simply closes
            conn.close()
            return
        self._send_on(conn)

    def _on_answer(self, status: int, body: bytes, content_type: bytes, exc: BaseException | None) -> None:
        if self._done:
            return
        if isinstance(exc, StaleConnection) and not self._resent:
            self._resent = True  # the worker had just closed that idle connection: resend on a new one
            self._connect_in_task(fresh=True)
            return
        self._done = True
        self._conn = None
        self._answered.set()
        state, w = self._state, self.worker
        if exc is not None:
            if isinstance(exc, UpstreamTimeout):
                state.send_abort(w, self._rids)  # a slow prefill still holds the room: it drops it now
            else:
                state.registry.record_request_failure(w, self._epoch, state.config.health_failure_threshold,
                                                      str(exc))
            self._fail(PrefillUnreachable(f"prefill {w.url}: {exc}"))
        elif status >= 400:
            self._fail(PrefillFailed(status, body, content_type))
        else:
            if w.consecutive_failures:
                state.registry.record_success(w)
            if self._expected is not None:
                self._learn(body)
        self._release_worker()

    def _learn(self, body: bytes) -> None:
        """Hand the worker's hit report to the policy that expected a hit there (a byte search, no parse)."""
        assert self._expected is not None
        cached, prompt = _int_after(body, b'"cached_tokens":'), _int_after(body, b'"prompt_tokens":')
        if cached is not None and prompt is not None:
            self._state.prefill_policy.observe_hit(self._expected, cached, prompt)

    def _release_worker(self) -> None:
        w = self.worker
        w.in_flight -= 1
        if self._charge is not None:
            self._charge.release()
        if w.draining:
            self._state.registry.release_if_drained(w)

    def _fail(self, exc: UpstreamError) -> None:
        self.failure = exc
        self.worker.stats.errors += 1
        if self._decode_conn is not None and not self.committed:
            self._decode_conn.fail(exc, self._decode_exchange)

    def abort(self) -> None:
        """Decode gave up or the client left: stop the prefill side as well."""
        if self._done:
            return
        self._done = True
        self._answered.set()
        if self._task is not None:
            self._task.cancel()
        if self._conn is not None:
            self._conn.close()  # the worker sees the disconnect
            self._conn = None
        self._release_worker()
        self._state.send_abort(self.worker, self._rids)


class Proxy:
    def __init__(self, state: RouterState) -> None:
        self._state = state
        self._getrandbits = random.getrandbits

    def _choose(self, role: Role, inbound: InboundRequest, tried: set[Worker], last: BaseException | None):
        state = self._state
        candidates = state.registry.candidates(role)
        if tried:
            candidates = [w for w in candidates if w not in tried]
        if not candidates:
            if not tried:  # none healthy at all: whoever comes back first is wanted now
                state.health.wanted([w for w in state.registry.all_workers() if w.role is role])
            if last is not None:
                raise RouterError(502, f"no {role.value} worker could be reached: {last}", code="upstream_unreachable")
            raise RouterError(503, f"no healthy {role.value} worker", code="no_worker", retry_after_s=1)
        policy = state.prefill_policy if role is Role.PREFILL else state.decode_policy
        return policy.choose(candidates, inbound.prompt_key)

    async def forward(self, client: HttpConnection, inbound: InboundRequest, rid: str, rid_b: bytes,
                      fwd_headers: bytes) -> None:
        """Serve `inbound` through a (prefill, decode) pair and answer `client`. `rid` is the client's
        X-Request-ID (or one made up), echoed back as `rid_b`; `fwd_headers` go to both workers."""
        state = self._state
        cfg = state.config
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + cfg.request_timeout_s
        decode_only = (
            inbound.prompt_tokens < cfg.short_prompt_threshold or not state.registry.has_role(Role.PREFILL)
            or inbound.colocated
        )
        state.stats.count_request(inbound.kind.value, "decode_only" if decode_only else "pd")
        tried: set[Worker] = set()
        last: BaseException | None = None
        for attempt in range(cfg.max_retries + 1):
            decode = self._choose(Role.DECODE, inbound, tried, last)
            decode_expected = None if decode_only else state.decode_policy.expectation()
            prefill = None if decode_only else self._choose(Role.PREFILL, inbound, tried, last)
            expected = state.prefill_policy.expectation() if prefill is not None else None
            try:
                return await self._attempt(
                    client, inbound, prefill, decode, rid, rid_b, fwd_headers, started, deadline,
                    last_attempt=attempt == cfg.max_retries, expected=expected, decode_expected=decode_expected,
                )
            except _Retry as retry:
                tried.add(retry.worker)
                last = retry.cause
                log.info("request %s: %s failed before any byte was sent (%s); retrying", rid,
                         retry.worker.url, retry.cause)
        state.stats.count_error("upstream_unreachable")
        raise RouterError(502, f"workers could not be reached: {last}", code="upstream_unreachable")

    async def _attempt(
        self,
        client: HttpConnection,
        inbound: InboundRequest,
        prefill: Worker | None,
        decode: Worker,
        rid: str,
        rid_b: bytes,
        fwd_headers: bytes,
        started: float,
        deadline: float,
        last_attempt: bool,
        expected: Expectation | None = None,
        decode_expected: Expectation | None = None,
    ) -> None:
        """`expected` / `decode_expected`: what the cache-aware choice of prefill / decode assumed about the
        chosen worker's cache, checked against its hit report (prefill: `cached_tokens` in its answer;
        decode, with decode-side reuse: the reuse header)."""
        state = self._state
        path = inbound.kind.value
        internal = new_request_id()
        rids = abort_rids(inbound, internal)
        echo, items = client_ids(inbound, rid)
        # A batch /generate answers per item (`meta_info.id` is `<internal>-<i>`); an OpenAI answer has one
        # id for all its choices, the router's own, which becomes the client's.
        rename = IdRewriter(internal, echo, items if inbound.kind is Kind.GENERATE else None)
        fwd_headers = b"X-Request-ID: " + internal.encode() + b"\r\n" + fwd_headers
        # The attention-DP groups (router.dp_routing): the client's own choice, else the least loaded.
        dp = state.dp
        decode_group = dp.pick(decode, requested_dp_rank(inbound, DATA_PARALLEL_RANK))
        prefill_group = None
        if prefill is not None:
            prefill_group = dp.pick(prefill, requested_dp_rank(inbound, DISAGG_PREFILL_DP_RANK))
        outputs = (inbound.batch_size or 1) * output_budget(inbound.doc)
        decode_charge = (Charge(decode.dp, decode_group, inbound.prompt_tokens + outputs)
                         if decode_group is not None else None)
        job: PrefillJob | None = None
        if prefill is not None:
            n = inbound.batch_size
            room = self._getrandbits(_ROOM_BITS) if n is None else [self._getrandbits(_ROOM_BITS) for _ in range(n)]
            body = worker_body(inbound, internal, prefill, room, decode_group, prefill_group)
            charge = Charge(prefill.dp, prefill_group, inbound.prompt_tokens) if prefill_group is not None else None
            job = PrefillJob(state, prefill, build_request("POST", path, prefill.netloc, body, fwd_headers),
                             deadline, rids, expected, charge)
        else:
            body = worker_body(inbound, internal, None, None, decode_group)
        decode.in_flight += 1
        decode.stats.requests += 1
        epoch = decode.failure_epoch
        state.active.add(internal, (rid, echo, *(items or ())), (prefill, decode, rids))
        conn: UpstreamConnection | None = None
        exchange = 0
        done = False  # decode's answer was passed on whole: nothing to abort
        loop = asyncio.get_running_loop()
        try:
            try:
                conn = await state.pool.request(
                    decode.host, decode.port, build_request("POST", path, decode.netloc, body, fwd_headers),
                    deadline, job.watch if job is not None else None,
                )
                exchange = conn.exchange
                status = conn.status
                if status in _RETRY_STATUSES and job is not None:
                    # Decode's transfer failed. Where prefill failed the room itself (a fault of this request, such
                    # as logits that came out NaN: a 500 or a 4xx, not a transfer's 502), its answer is the reason
                    # the client gets, and another pair would only repeat it.
                    cause = await job.verdict(PREFILL_VERDICT_S)
                    if cause is not None and cause.status not in _RETRY_STATUSES:
                        raise cause
                if status in _RETRY_STATUSES and not last_attempt:
                    raise _Retry(decode, UpstreamError(f"decode {decode.url} answered {status}"))
                if status >= 400:
                    data = await conn.read_all()
                    decode.stats.errors += 1
                    state.stats.count_error(f"decode_{status}")
                    if job is not None:  # whatever decode's reason, the pair is over: free prefill's room
                        job.committed = True
                        job.abort()
                    done = True
                    return passthrough(client, status, conn.content_type(), rename(data), rid_b)
                if not inbound.stream:
                    data = conn.body_if_complete()  # the common case: no further wait
                    decode.stats.ttft.observe(loop.time() - started)
                    if data is None:
                        data = await conn.read_all()
                else:
                    first = await conn.read_chunk()
                    decode.stats.ttft.observe(loop.time() - started)
            except PrefillFailed as pf:
                state.stats.count_error(f"prefill_{pf.status}")
                return passthrough(client, pf.status, pf.content_type, rename(pf.body), rid_b)
            except PrefillUnreachable as exc:
                assert prefill is not None
                raise _Retry(prefill, exc) from None
            except UpstreamTimeout as exc:
                state.stats.count_error("timeout")
                decode.stats.errors += 1
                raise RouterError(504, f"request timed out: {exc}", code="timeout") from None
            except UpstreamError as exc:
                decode.stats.errors += 1
                state.registry.record_request_failure(decode, epoch, state.config.health_failure_threshold, str(exc))
                raise _Retry(decode, exc) from None
            if decode.consecutive_failures:
                state.registry.record_success(decode)
            if decode_expected is not None:
                report = _reuse_report(conn)
                if report is not None:
                    state.decode_policy.observe_hit(decode_expected, *report)
            # From here on a failure is judged against what was known when decode last answered, not
            # when the request was sent: a failure recorded in between (a probe) is not this one.
            epoch = decode.failure_epoch
            if job is not None:
                job.committed = True
            if not inbound.stream:
                done = True
                failure = whole_answer_failure(data)
                if failure is not None:  # a 200 that carries no result is not a success
                    self._pair_failed(job, decode, failure)
                    raise RouterError(502, failure, code="request_failed")
                return passthrough(client, conn.status, conn.content_type(), rename(data), rid_b)
            failure, cut = await self._stream(client, conn, first, rid_b, decode, StreamGuard(rename))
            done = True
            if failure is not None:
                self._pair_failed(job, decode, failure, counted=cut is not None)
            if cut is not None:  # decode's answer broke off (or timed out): it drops the request too
                state.send_abort(decode, rids)
                if not isinstance(cut, UpstreamTimeout):  # a cut is the same evidence as a refused connect
                    state.registry.record_request_failure(decode, epoch, state.config.health_failure_threshold,
                                                          str(cut))
        finally:
            decode.in_flight -= 1
            if decode_charge is not None:
                decode_charge.release()
            state.active.remove(internal)
            if not done:
                # Client gone, timeout, retry or error: both workers drop the request now.
                if conn is not None:
                    conn.abort_exchange(exchange)
                state.send_abort(decode, rids)
                if job is not None:
                    job.abort()
            decode.stats.latency.observe(loop.time() - started)
            if decode.draining:
                state.registry.release_if_drained(decode)

    def _pair_failed(self, job: PrefillJob | None, decode: Worker, reason: str, counted: bool = False) -> None:
        """Decode's answer ended without the result: prefill drops its half now. `counted`: the
        error is in the metrics already (a cut stream)."""
        if not counted:
            decode.stats.errors += 1
            self._state.stats.count_error("decode_failed")
        log.info("decode %s failed a request (%s)%s", decode.url, reason,
                 "; aborting its prefill half" if job is not None else "")
        if job is not None:
            job.abort()

    async def _stream(
        self, client: HttpConnection, conn: UpstreamConnection, first: bytes, rid_b: bytes, decode: Worker,
        guard: StreamGuard,
    ) -> tuple[str | None, UpstreamError | None]:
        """Relay decode's stream to `client`: (why it failed or None, the error that cut it off or None)."""
        # The head goes out with the first bytes; the last bytes go out with the end of the answer.
        client.start_stream(conn.status, conn.content_type(b"text/event-stream"),
                            b"Cache-Control: no-cache\r\nX-Request-ID: " + rid_b + b"\r\n", guard.feed(first))
        # Body bytes go to the client socket straight from the upstream socket's callback: one
        # write per upstream read and no task switch in between.
        feed, client_write, client_write_last = guard.feed, client.write, client.write_last

        def write(data: bytes) -> None:
            client_write(feed(data))

        def write_last(data: bytes) -> None:
            client_write_last(feed(data) + guard.end())

        try:

            t = client.transport
            buffered = t.get_write_buffer_size if t is not None else client.write_buffer_size

            def congested() -> bool:  # asked after every relayed piece: kept to one call
                return buffered() > _CLIENT_HIGH_WATER

            while not await conn.relay(write, congested, write_last):
                while client.write_buffer_size() > _CLIENT_LOW_WATER:  # a slow client
                    if client.closing:
                        raise ConnectionResetError("client went away")
                    await asyncio.sleep(0.005)
            client_write(guard.end())  # an unterminated last event, if the end came without write_last
        except UpstreamError as exc:
            # Headers are out: the error can only be told in the stream itself (as SGLang does). An
            # unfinished event held back by the guard is dropped: it would garble the error event.
            decode.stats.errors += 1
            self._state.stats.count_error("timeout" if isinstance(exc, UpstreamTimeout) else "stream_broken")
            reason = f"decode worker failed mid-stream: {exc}"
            client_write(failure_event(reason))
            client.end_stream()
            return reason, exc
        client.end_stream()
        return guard.failure, None


def passthrough(client: HttpConnection, status: int, content_type: bytes | None, body: bytes, rid_b: bytes) -> None:
    """Answer `client` with a worker's answer; an error that is not OpenAI-shaped is wrapped into one."""
    if status >= 400 and not is_openai_error(body):
        # A worker's non-OpenAI error (plain text, FastAPI `detail`, ...) is wrapped into the contract.
        try:
            detail = orjson.loads(body)
        except orjson.JSONDecodeError:
            detail = body.decode("utf-8", "replace")
        message = detail.get("detail") or detail.get("message") if isinstance(detail, dict) else None
        body = error_body(status, str(message or detail or f"worker answered {status}"))
        content_type = b"application/json"
    client.respond(status, body, content_type or b"application/json", b"X-Request-ID: " + rid_b + b"\r\n")
