"""What the prefill and decode roles share on a rank: the KV flags, the transfer engine with this rank's
KV pool and aux buffer registered, and how the ranks of one attention-DP group agree on each room's fate.

Why agreement: every rank of a DP group runs the same batch each step (TP collectives line up only if
they do), but each rank watches its own transfers, and they end at different moments on different
ranks. A room leaves the transfer stage (its pages freed, or its request joining the decode batch) only
at a step where every rank of the group has seen it end; `GroupAgreement` is that one all-reduce.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from aiohttp import web

from kvtransfer.auxdata import MAX_TOP_LOGPROBS, aux_slot_bytes
from kvtransfer.engines import TransferEngine, make_engine
from kvtransfer.layout import AuxLayout, PageLayout
from kvtransfer.state import KVPoll, KVTimeouts

from .launch import RankContext


def leave_cleanly_on_sigterm() -> None:
    """The launcher stops ranks with SIGTERM, whose default action skips every `finally`. Turn it into
    SystemExit so the rank leaves through `run_rank`'s `finally`: the KV manager fails its live rooms and
    tells their peers (instead of leaving them to the dead-peer timeout), deregisters from the bootstrap
    service, and the transfer engine releases its registrations. The launcher SIGKILLs after a grace
    period if that hangs."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))


# One aux slot holds the first output token, its logprob and up to MAX_TOP_LOGPROBS alternatives
# (kvtransfer.auxdata); both sides must agree on it.
AUX_SLOT_BYTES = aux_slot_bytes(MAX_TOP_LOGPROBS)


@dataclass(frozen=True)
class KVArgs:
    """How a rank joins the KV transfer plane (sent to each rank at spawn).

    backend: "nixl" | "mooncake".
    host: the address peers reach this rank's control channel (and Mooncake's RPC) at.
    aux_slots: aux slots per rank; bounds the rooms a rank has in transfer at once.
    timeouts: every wait of the control plane.
    bootstrap_addr: "host:port" of the prefill instance's bootstrap service (prefill ranks only).
    connector: "transfer" (the real plane above) or "bench" (no transfer engine at all: decode fills each
        request's pages with random values, prefill drops the KV it computed; see `KV_CONNECTORS`).
    progress_thread: NIXL only: run the agent's progress thread (a spinning core per rank) instead of
        progressing from the rank's loop (`TransferEngine.progress`); for transports that never need the
        target's help (cuda_ipc, RDMA) it buys nothing.
    nixl_threads: NIXL only: UCX worker threads posting one write's descriptors; None: `nixl_threads_for`.
    mooncake_protocol: Mooncake only: "tcp" (the wheels still pick RDMA by themselves where a NIC is) or
        "nvlink_intra" (GPU pools, prefill and decode on one host: CUDA IPC instead of staging through the
        host over TCP — 1.4-1.8 GB/s vs 0.66-0.93x of copy_ on one H100).
    """

    backend: str
    host: str
    aux_slots: int
    timeouts: KVTimeouts
    bootstrap_addr: str | None = None
    connector: str = "transfer"
    progress_thread: bool = False
    nixl_threads: int | None = None
    mooncake_protocol: str = "tcp"
    # The bootstrap service's bearer token (prefill ranks register with it); kept out of reprs and logs.
    auth_token: str | None = field(default=None, repr=False)
    # The deployment's token (`--kv-auth-token`, never a per-instance secret: decode ranks must know it
    # too), which signs the control channel between prefill and decode ranks; None: an open channel.
    control_key: str | None = field(default=None, repr=False)


MOONCAKE_PROTOCOLS = ("tcp", "nvlink_intra")


def nixl_threads_for(device: str) -> int:
    """NIXL worker threads for a pool on `device` when `--kv-nixl-threads` is unset. Threads post one write's
    descriptors in parallel: they pay with thousands of small descriptors (per-layer pages: 13 -> 21 GB/s
    on one H100) and cost with the few large ones our cross-layer pages give: 4k-token prompt at 64-token
    pages, H100, cuda_ipc, 0 vs 4 threads: contiguous 0.94 vs 0.91 of copy_, every other page 0.48 vs
    0.36 (bench/results/kv_transfer_cuda_h100_nixl.json). On DRAM over TCP the 4 threads were ahead
    (bench/results/kv_transfer_cpu.json)."""
    return 0 if device.startswith("cuda") else 4


# `--kv-connector`: "bench" cuts the KV plane out so one role can be profiled alone (issue 7). Its
# results are not end-to-end numbers: the workers say so in a response header and in /server_info.
KV_CONNECTORS = ("transfer", "bench")
BENCH_CONNECTOR = "bench"
KV_CONNECTOR_HEADER = "x-tandem-kv-connector"  # bench.serving labels the run from it


def add_kv_flags(parser: argparse.ArgumentParser) -> None:
    kv = parser.add_argument_group("KV transfer")
    kv.add_argument(
        "--kv-host",
        default=None,
        help="address peers reach this instance's ranks at for KV control messages and writes; "
        "unset: --host, or 127.0.0.1 when --host is a wildcard",
    )
    kv.add_argument(
        "--kv-aux-slots",
        type=int,
        default=None,
        help="aux slots per rank (first token + logprob), i.e. rooms in transfer at once; "
        "unset: --max-running-requests",
    )
    kv.add_argument(
        "--kv-bootstrap-timeout",
        type=float,
        default=120.0,
        help="seconds a room waits for the other side to show up; the prefill side keeps the "
        "computed KV at most this long while decode reserves pages",
    )
    kv.add_argument(
        "--kv-transfer-timeout",
        type=float,
        default=600.0,
        help="seconds from the end of bootstrapping to the last page landed",
    )
    kv.add_argument(
        "--kv-peer-timeout",
        type=float,
        default=10.0,
        help="a peer silent this long is dead and its rooms fail (heartbeats every quarter of it)",
    )
    kv.add_argument(
        "--kv-nixl-threads",
        type=int,
        default=None,
        help="NIXL: UCX worker threads per agent; unset: 0 for GPU pools (few large descriptors), 4 for "
        "CPU pools",
    )
    kv.add_argument(
        "--kv-mooncake-protocol",
        choices=MOONCAKE_PROTOCOLS,
        default="tcp",
        help="Mooncake: 'nvlink_intra' moves GPU KV by CUDA IPC when prefill and decode share a host (every "
        "peer must be on it); 'tcp' otherwise (RDMA is still chosen by Mooncake where a NIC is found)",
    )
    kv.add_argument(
        "--kv-progress-thread",
        action="store_true",
        help="NIXL: run each agent's progress thread; it spins a CPU core per rank even when idle. Off: the "
        "rank's loop progresses incoming writes (decode polls its receivers every step)",
    )
    kv.add_argument(
        "--kv-auth-token",
        default=None,
        help="the deployment's shared token (env " + AUTH_TOKEN_ENV + "): rank registrations and deletions "
        "at a prefill bootstrap service must carry it, and the control channel between prefill and decode "
        "ranks is signed with it (give every prefill and decode worker the same one); unset: the bootstrap "
        "service takes a secret drawn per instance (one node only) and the control channel is open",
    )
    kv.add_argument(
        "--kv-connector",
        choices=KV_CONNECTORS,
        default="transfer",
        help="'bench': no transfer engine; a decode worker fills every request's KV pages with random "
        "values (no prefill instance needed, bootstrap fields optional), a prefill worker computes the "
        "KV and drops it; results are labelled 'kv-connector=bench', never end-to-end",
    )


AUTH_TOKEN_ENV = "TANDEM_KV_AUTH_TOKEN"


def deployment_token(args: argparse.Namespace) -> str | None:
    """The token the deployment shares (`--kv-auth-token`, then `TANDEM_KV_AUTH_TOKEN`), or None."""
    return getattr(args, "kv_auth_token", None) or os.environ.get(AUTH_TOKEN_ENV) or None


def auth_token(args: argparse.Namespace, nnodes: int = 1) -> str | None:
    """The bootstrap service's token: the deployment's (flag, then environment), else a fresh secret of
    this instance, which only its own ranks learn (at launch). Ranks on other nodes cannot learn a
    per-instance secret: a multi-node instance without a deployment token runs its service open."""
    token = deployment_token(args)
    if token is None and nnodes == 1:
        token = secrets.token_hex(16)
    return token


def kv_args(args: argparse.Namespace, bootstrap_addr: str | None = None, token: str | None = None) -> KVArgs:
    host = args.kv_host or (args.host if args.host not in ("0.0.0.0", "::", "") else "127.0.0.1")
    slots = args.kv_aux_slots or args.max_running_requests
    if slots < 1:
        raise ValueError(f"--kv-aux-slots must be >= 1, got {slots}")
    if args.kv_nixl_threads is not None and args.kv_nixl_threads < 0:
        raise ValueError(f"--kv-nixl-threads must be >= 0, got {args.kv_nixl_threads}")
    peer = args.kv_peer_timeout
    timeouts = KVTimeouts(
        bootstrap_s=args.kv_bootstrap_timeout,
        transfer_s=args.kv_transfer_timeout,
        heartbeat_interval_s=min(1.0, peer / 4),
        peer_timeout_s=peer,
        fence_s=min(5.0, peer),
    )
    return KVArgs(
        backend=args.transfer_backend,
        host=host,
        aux_slots=slots,
        timeouts=timeouts,
        bootstrap_addr=bootstrap_addr,
        connector=args.kv_connector,
        progress_thread=args.kv_progress_thread,
        nixl_threads=args.kv_nixl_threads,
        mooncake_protocol=args.kv_mooncake_protocol,
        auth_token=token,
        control_key=deployment_token(args),
    )


async def mark_bench_responses(app: web.Application) -> None:
    """`on_startup` hook of a bench-connector worker: every response carries `KV_CONNECTOR_HEADER: bench`,
    so a benchmark client cannot mistake its numbers for end-to-end ones. A signal, not a middleware:
    streamed responses send their headers before a middleware would see them."""

    async def add_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[KV_CONNECTOR_HEADER] = BENCH_CONNECTOR

    app.on_response_prepare.append(add_header)


class RankTransport:
    """This rank's transfer engine with its KV pool and aux buffer registered once, at start-up.

    Attributes: `engine`, `layout` (the pool's `PageLayout`), `aux` (`AuxLayout` of the host aux buffer).
    Owns the engine and the aux buffer; the pool tensor stays the caller's and must outlive this object.
    Call `close()` (after the KV manager that uses the engine is closed).
    """

    def __init__(self, kv: KVArgs, role: str, rank: int, pool: torch.Tensor) -> None:
        # Peers address an engine by name: unique per rank of every instance, also across restarts.
        name = f"{role}-{uuid.uuid4().hex[:8]}-{os.getpid()}-r{rank}"
        self.layout = PageLayout.from_tensor(pool)
        device = self.layout.device
        options: dict[str, object] = {"hostname": kv.host, "protocol": kv.mooncake_protocol}
        if kv.backend == "nixl":
            threads = kv.nixl_threads if kv.nixl_threads is not None else nixl_threads_for(device)
            options = {"progress_thread": kv.progress_thread, "num_threads": threads}
        self.engine: TransferEngine = make_engine(kv.backend, name, **options)
        try:
            # Host memory, unless the transport moves GPU memory only (kvtransfer.auxdata).
            aux_device = device if kv.backend == "mooncake" and kv.mooncake_protocol == "nvlink_intra" else "cpu"
            self._aux_buffer = torch.zeros(kv.aux_slots * AUX_SLOT_BYTES, dtype=torch.uint8, device=aux_device)
            self.aux = AuxLayout(self._aux_buffer.data_ptr(), AUX_SLOT_BYTES, kv.aux_slots, aux_device)
            self.engine.register(self.layout.base_ptr, self.layout.pool_bytes, device)
            self.engine.register(self.aux.base_ptr, self.aux.pool_bytes, aux_device)
        except BaseException:
            self.engine.close()
            raise

    def close(self) -> None:
        self.engine.close()
        self._aux_buffer = torch.empty(0, dtype=torch.uint8)


# A room's state on one rank, as the agreement counts it.
PENDING, SUCCEEDED, FAILED = 0, 1, 2


def local_state(poll: KVPoll) -> int:
    if poll is KVPoll.Success:
        return SUCCEEDED
    return FAILED if poll is KVPoll.Failed else PENDING


class GroupAgreement:
    """All-reduces the rooms' states over this rank's attention-DP group (gloo, CPU tensors).

    Build it on every rank at the same point of start-up: creating process groups is a collective over
    the whole instance. `agree` must then be called by every rank of the group at the same step, with
    the rooms in the same order — the room lists are identical across a group by construction (the rank
    loop hands every rank the same requests, and rooms leave only on agreed outcomes).
    """

    def __init__(self, ctx: RankContext) -> None:
        spec = ctx.spec
        self.size = spec.attn_tp_size
        self.group = None
        if self.size > 1:
            groups = [
                dist.new_group(list(range(g * self.size, (g + 1) * self.size)), backend="gloo")
                for g in range(spec.dp_size)
            ]
            self.group = groups[ctx.dp_rank]

    def agree(self, states: Sequence[int]) -> list[tuple[bool, bool]]:
        """(ended on every rank, failed on some rank) per room, from this rank's `states`."""
        if self.size == 1 or not states:
            return [(s != PENDING, s == FAILED) for s in states]
        ended = [int(s != PENDING) for s in states]
        failed = [-int(s == FAILED) for s in states]
        # One MIN all-reduce: min(ended) = every rank ended; min(-failed) = -(some rank failed).
        tensor = torch.tensor(ended + failed, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        values = tensor.tolist()
        n = len(states)
        return [(values[i] == 1, values[n + i] == -1) for i in range(n)]
