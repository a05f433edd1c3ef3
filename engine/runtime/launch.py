"""Starting the ranks of one instance and tearing them all down when one fails.

An instance of `tp_size` ranks runs one process per rank (spawned, so CUDA is never forked).
The launcher watches them: a rank that exits before `stop()` ends the whole instance, and the
`on_death` callback lets the HTTP process answer its open requests with an error instead of
hanging on a collective that can never complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import random
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message names the numbers that clash."""


# --attention-dp: "whole" is attention TP inside --dp groups (each group holds its requests' KV on all its
# ranks); "mla-core" keeps the projections TP over the whole instance and gives each request's latent KV
# to one rank (engine.mla_core).
ATTENTION_DP_MODES = ("whole", "mla-core")


def add_attention_dp_flag(parser: Any) -> None:
    """``--attention-dp`` on a parser or argument group (engine.generate and both workers)."""
    parser.add_argument("--attention-dp", choices=ATTENTION_DP_MODES, default="whole",
                        help="whole: attention TP inside --dp groups; mla-core: q/kv projections TP over all "
                             "ranks, each request's latent KV on one rank (least loaded), needs --dp 1")


@dataclass(frozen=True)
class InstanceSpec:
    """Parallel layout and placement of one instance (SGLang's meaning of tp/dp; ``attention_dp`` as
    ``ATTENTION_DP_MODES``)."""

    tp_size: int = 1
    dp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # "host:port" of node 0; chosen automatically on one node
    device: str = "cpu"  # "cpu" | "cuda"
    attention_dp: str = "whole"

    def __post_init__(self) -> None:
        if self.attention_dp not in ATTENTION_DP_MODES:
            raise LayoutError(f"unknown --attention-dp {self.attention_dp!r}; choose one of "
                              f"{', '.join(ATTENTION_DP_MODES)}")
        if self.attention_dp == "mla-core" and self.dp_size != 1:
            raise LayoutError(f"--attention-dp mla-core spreads the KV over all tp ranks: it takes --dp 1, "
                              f"not {self.dp_size}")
        if self.tp_size < 1 or self.dp_size < 1:
            raise LayoutError(f"tp ({self.tp_size}) and dp ({self.dp_size}) must be at least 1")
        if self.tp_size % self.dp_size:
            raise LayoutError(f"tp ({self.tp_size}) is not divisible by dp ({self.dp_size})")
        if self.tp_size % self.nnodes:
            raise LayoutError(f"tp ({self.tp_size}) is not divisible by nnodes ({self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise LayoutError(f"node_rank {self.node_rank} is outside [0, nnodes={self.nnodes})")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise LayoutError("--dist-init-addr is required with more than one node")

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.dp_size

    @property
    def mla_core(self) -> bool:
        return self.attention_dp == "mla-core"

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def local_ranks(self) -> range:
        start = self.node_rank * self.ranks_per_node
        return range(start, start + self.ranks_per_node)

    def dp_rank_of(self, rank: int) -> int:
        return rank // self.attn_tp_size

    def attn_tp_rank_of(self, rank: int) -> int:
        return rank % self.attn_tp_size


@dataclass
class RankContext:
    """What a rank process is told at start: who it is and where to talk."""

    rank: int
    spec: InstanceSpec
    dist_addr: str  # "host:port" of node 0's TCPStore, or "file://PATH" on one node
    inbox_addr: str  # rank 0 binds a PULL socket here for requests from the HTTP process
    outbox_addr: str  # DP-group leaders connect a PUSH socket here for token outputs
    role_args: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        if self.spec.device == "cuda":
            return f"cuda:{self.rank % self.spec.ranks_per_node}"
        return self.spec.device

    @property
    def dp_rank(self) -> int:
        return self.spec.dp_rank_of(self.rank)

    @property
    def attn_tp_rank(self) -> int:
        return self.spec.attn_tp_rank_of(self.rank)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_run(count: int, host: str = "127.0.0.1") -> int:
    """A port p with p .. p + count - 1 all free now, drawn below the kernel's ephemeral range: a
    `--dist-init-addr` port, whose next two ports the instance's zmq sockets take. A port from
    `free_port` lies inside that range, where any outgoing connection may take its neighbours first."""
    rng = random.Random()
    for _ in range(500):
        first = rng.randrange(20000, 32000 - count)
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind((host, port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no run of {count} free ports found on {host}")


PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_CHECK_S = 0.5  # how often the fallback watcher looks at the parent


def die_with_parent(parent_pid: int, use_pdeathsig: bool) -> None:
    """Make this rank process end when the process that launched it ends, however it ends.

    A SIGKILLed HTTP process runs no clean-up, and `daemon=True` only covers a clean exit: its ranks would
    live on, holding the GPU, their ports and their bootstrap registration, and shadow an instance
    restarted on the same ports. Two mechanisms, because each has a gap:
    - Linux's parent-death signal (prctl): immediate, but it fires when the *thread* that forked us ends,
      so it is only armed when the launcher ran on its process's main thread (`use_pdeathsig`);
    - a watcher thread that blocks on multiprocessing's parent sentinel (a pipe whose other end closes
      when the parent dies) and checks the parent pid: any platform, any launching thread.
    Called first thing in the child; a parent that died before the signal was armed is caught by the
    pid check right after arming it."""
    import signal as signal_mod

    if use_pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal_mod.SIGKILL, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            log.warning("prctl unavailable (%s); relying on the parent watcher", exc)
    if os.getppid() != parent_pid:
        os._exit(1)
    parent = mp.parent_process()
    sentinel = parent.sentinel if parent is not None else None

    def watch() -> None:
        while True:
            if sentinel is not None:
                mp_connection.wait([sentinel], timeout=PARENT_CHECK_S)
            else:
                time.sleep(PARENT_CHECK_S)
            if os.getppid() != parent_pid:
                # No clean-up: the ranks of the other processes are going too, and a collective or an
                # engine close could block on them forever.
                os._exit(1)

    threading.Thread(target=watch, name="parent-watcher", daemon=True).start()


def _rank_main(ctx: RankContext, entry: Callable[[RankContext], None], parent_pid: int = 0,
               use_pdeathsig: bool = False) -> None:
    if parent_pid:
        die_with_parent(parent_pid, use_pdeathsig)
    import torch.distributed as dist

    backend = "nccl" if ctx.spec.device == "cuda" else "gloo"
    if ctx.spec.device == "cuda":
        import torch

        torch.cuda.set_device(ctx.device)
    if ctx.dist_addr.startswith("file://"):
        # One node: rendezvous through a file, not a TCPStore (whose server listens on every interface
        # whatever --host says), and gloo's pairs on loopback (by default on the hostname's address).
        init_method = ctx.dist_addr
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    else:
        host, port = ctx.dist_addr.rsplit(":", 1)
        init_method = f"tcp://{host}:{port}"
    if "elastic_join" not in ctx.role_args:  # a rank joining a running instance meets it once loaded
        dist.init_process_group(backend, init_method=init_method, rank=ctx.rank, world_size=ctx.spec.tp_size)
    try:
        entry(ctx)
    finally:
        if dist.is_initialized():  # a rank leaving a shrinking instance left its world already
            dist.destroy_process_group()


class InstanceProcesses:
    """The rank processes of this node; `stop()` ends them. Build with `launch()`."""

    def __init__(self, procs: list[mp.process.BaseProcess], on_death: Callable[[str], None] | None,
                 dist_file: str | None = None) -> None:
        self._procs = procs
        # The ranks' rendezvous files on one node (elastic EP adds one per scale): removed at stop().
        self._dist_files = [dist_file] if dist_file is not None else []
        self._leaving: set[str] = set()  # ranks a shrinking instance lets go: their clean exit is no death
        self._stopping = False
        self._on_death = on_death
        self.death_reason: str | None = None
        self._watcher = threading.Thread(target=self._watch, name="rank-watcher", daemon=True)
        self._watcher.start()

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def _watch(self) -> None:
        while not self._stopping:
            for p in list(self._procs):
                if not p.is_alive() and p.name in self._leaving and p.exitcode == 0:
                    self._procs.remove(p)
                    self._leaving.discard(p.name)
                    continue
                if not p.is_alive() and not self._stopping:
                    self.death_reason = f"rank process {p.name} exited with code {p.exitcode}"
                    log.error("%s; stopping the instance", self.death_reason)
                    self._terminate_all()
                    if self._on_death is not None:
                        self._on_death(self.death_reason)
                    return
            time.sleep(0.2)

    def _terminate_all(self, grace_s: float = 5.0) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)

    # --- elastic EP (engine.runtime.scaling) --------------------------------------------------------------
    def spawn(self, spec: InstanceSpec, ranks: range, entry: Callable[[RankContext], None], dist_addr: str,
              inbox_addr: str, outbox_addr: str, role_args: dict[str, Any]) -> list[mp.process.BaseProcess]:
        """Starts ``ranks`` of ``spec`` to join this instance; they are not watched until ``adopt``."""
        return _spawn(spec, ranks, entry, dist_addr, inbox_addr, outbox_addr, role_args)

    def adopt(self, procs: list[mp.process.BaseProcess]) -> None:
        """Joined ranks are members now: their death ends the instance."""
        self._procs.extend(procs)

    def let_go(self, first_rank: int) -> None:
        """Ranks from ``first_rank`` up leave (a scale-down): their exit with code 0 is expected."""
        self._leaving.update(p.name for p in self._procs if int(p.name.removeprefix("rank")) >= first_rank)

    def keep(self) -> None:
        """A scale-down that did not happen: every rank is a member again."""
        self._leaving.clear()

    def add_dist_file(self, path: str) -> None:
        self._dist_files.append(path)

    def wait(self, timeout: float | None = None) -> None:
        for p in self._procs:
            p.join(timeout)

    def stop(self) -> None:
        self._stopping = True
        self._terminate_all()
        for path in self._dist_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def launch(
    spec: InstanceSpec,
    entry: Callable[[RankContext], None],
    inbox_addr: str,
    outbox_addr: str,
    role_args: dict[str, Any] | None = None,
    on_death: Callable[[str], None] | None = None,
) -> InstanceProcesses:
    """Spawns this node's ranks, each running `entry(ctx)` after torch.distributed is up. Across nodes they
    meet at `spec.dist_init_addr`; on one node through a fresh file (no listening socket)."""
    dist_file = None
    if spec.dist_init_addr:
        dist_addr = spec.dist_init_addr
    else:
        dist_file = os.path.join(tempfile.gettempdir(), f"tandem-dist-{os.getpid()}-{uuid.uuid4().hex}")
        dist_addr = f"file://{dist_file}"
    procs = _spawn(spec, spec.local_ranks(), entry, dist_addr, inbox_addr, outbox_addr, role_args or {})
    return InstanceProcesses(procs, on_death, dist_file)


def _spawn(spec: InstanceSpec, ranks: range, entry: Callable[[RankContext], None], dist_addr: str, inbox_addr: str,
           outbox_addr: str, role_args: dict[str, Any]) -> list[mp.process.BaseProcess]:
    mpctx = mp.get_context("spawn")
    procs = []
    on_main_thread = threading.current_thread() is threading.main_thread()  # see die_with_parent
    for rank in ranks:
        ctx = RankContext(rank, spec, dist_addr, inbox_addr, outbox_addr, dict(role_args))
        proc = mpctx.Process(target=_rank_main, args=(ctx, entry, os.getpid(), on_main_thread), name=f"rank{rank}",
                             daemon=True)
        proc.start()
        procs.append(proc)
    return procs


def ipc_addr(tag: str) -> str:
    """A fresh zmq ipc endpoint under the temp dir (unique per process and tag)."""
    base = os.environ.get("TMPDIR", "/tmp")
    return f"ipc://{base}/tandem-{os.getpid()}-{tag}-{time.monotonic_ns()}"
