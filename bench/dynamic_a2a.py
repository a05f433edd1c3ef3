"""Latency of MLA-core DP's head exchange: the CUDA-IPC backend replayed in a CUDA graph vs the two-step
torch.distributed reference (split sizes exchanged, host read, then ``all_to_all_single`` + transpose).

    python -m bench.dynamic_a2a [--world 2] [--shared-gpu] [--batches 8,16,32,64,128,256] \
        [--out bench/results/dynamic_a2a_h100x2.json]

``world`` rank processes, one per GPU (reference over NCCL), or with ``--shared-gpu`` all on cuda:0 (NCCL
refuses two ranks on one GPU, so the reference there runs over gloo through the host: a correctness
baseline more than a rival). Two row shapes, as in SGLang PR #5000's measurements: ``hidden`` (one 7168-wide
row per token) and ``latent`` (DeepSeek-V3's 128 heads split over the ranks, 576 values each: what
``heads_to_owner`` moves per layer). Each timed iteration uses a new random split of the batch over the ranks
(the same on every rank), copied into the graph's static split tensor before the replay. Per exchange, median
of 5 loops of 50: ``ref`` (its host read syncs every call), ``ipc_eager`` and ``ipc_graph`` (a loop of copy +
replay, one synchronise at the end). With ``--shared-gpu`` also ``ipc_streams``: the same graphs with the
ranks as CUDA streams of one process (``IpcAllToAll.in_process``), i.e. without context time-slicing.
Prints a table; writes JSON and a PNG beside it.

Measured with ``--shared-gpu`` on one H200 (bench/results/dynamic_a2a_h200_shared.*): the IPC exchange costs
~4.5 ms whatever its size, eager or replayed. That is GPU time-slicing, not the copy: without MPS the two
processes' contexts take turns on the GPU, and each barrier waits for the other context's turn. The
decode-size latency this backend is for (NVLink P2P between GPUs, no time-slicing) needs one GPU per rank:
``python -m bench.dynamic_a2a --world 2`` (or ``--world 8``) on a multi-GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = {"hidden": (None, 7168), "latent": (128, 576)}  # (total heads or None for one row, values per head)
ITERS, REPEATS = 50, 5


def _splits(batch: int, world: int, count: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        owners = torch.randint(0, world, (batch,), generator=gen)
        out.append(torch.bincount(owners, minlength=world).tolist())
    return out


def _time(fn: Any, sync: Any) -> float:
    times = []
    for _ in range(REPEATS):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) / ITERS * 1e6)
    return statistics.median(times)


def _rank(rank: int, args: argparse.Namespace, path: str, queue: Any) -> None:
    from kernels.dynamic_a2a import heads_to_owner
    from kernels.dynamic_a2a_ipc import IpcAllToAll

    world = args.world
    device = torch.device("cuda", 0 if args.shared_gpu else rank)
    torch.cuda.set_device(device)
    backend = "gloo" if args.shared_gpu else "nccl"
    dist.init_process_group(backend, init_method=f"file://{path}", rank=rank, world_size=world)
    ref_group = dist.group.WORLD
    handle_group = dist.new_group(backend="gloo")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for shape, (heads_total, dim) in SHAPES.items():
        heads = 1 if heads_total is None else heads_total // world
        a2a = IpcAllToAll(handle_group, rank, world, max(batches), heads, dim, dim, torch.bfloat16, device)
        for batch in batches:
            splits = [torch.tensor(s, device=device) for s in _splits(batch, world, ITERS, seed=batch)]
            x = torch.randn(batch, heads, dim, device=device).to(torch.bfloat16)
            counts = splits[0].clone()

            def ref(x: torch.Tensor = x, splits: list[torch.Tensor] = splits) -> None:
                for split in splits:
                    heads_to_owner(x, split, ref_group, world)

            def ipc_eager(
                x: torch.Tensor = x,
                splits: list[torch.Tensor] = splits,
                counts: torch.Tensor = counts,
                a2a: IpcAllToAll = a2a,
            ) -> None:
                for split in splits:
                    counts.copy_(split)
                    a2a.heads_to_owner(x, counts)

            ipc_eager()  # compile, and warm the reference's communicator
            ref()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                a2a.heads_to_owner(x, counts)

            def ipc_graph(
                splits: list[torch.Tensor] = splits,
                counts: torch.Tensor = counts,
                graph: torch.cuda.CUDAGraph = graph,
            ) -> None:
                for split in splits:
                    counts.copy_(split)
                    graph.replay()

            def sync() -> None:
                torch.cuda.synchronize(device)
                dist.barrier(group=handle_group)

            row = {
                "shape": shape,
                "batch": batch,
                "heads_per_rank": heads,
                "dim": dim,
                "bytes_per_rank": batch * heads * dim * 2,
                "ref_us": _time(ref, sync),
                "ipc_eager_us": _time(ipc_eager, sync),
                "ipc_graph_us": _time(ipc_graph, sync),
            }
            row["ref_over_ipc_graph"] = row["ref_us"] / row["ipc_graph_us"]
            rows.append(row)
            del graph
        a2a.close()
    if rank == 0:
        queue.put(rows)
    dist.barrier(group=handle_group)
    dist.destroy_process_group()


def _streams_us(world: int, batches: list[int]) -> dict[tuple[str, int], float]:
    """µs per exchange with the ranks as CUDA streams of this one process (``IpcAllToAll.in_process``): the
    same kernels and barriers, graph-replayed, without the context time-slicing of ranks as processes."""
    from kernels.dynamic_a2a_ipc import IpcAllToAll

    device = torch.device("cuda", 0)
    out: dict[tuple[str, int], float] = {}
    for shape, (heads_total, dim) in SHAPES.items():
        heads = 1 if heads_total is None else heads_total // world
        ranks = IpcAllToAll.in_process(world, max(batches), heads, dim, dim, torch.bfloat16, device)
        streams = [torch.cuda.Stream(device) for _ in ranks]
        for batch in batches:
            splits = [torch.tensor(s, device=device) for s in _splits(batch, world, ITERS, seed=batch)]
            xs = [torch.randn(batch, heads, dim, device=device).to(torch.bfloat16) for _ in ranks]
            counts = [splits[0].clone() for _ in ranks]
            torch.cuda.synchronize(device)
            for a2a, stream, x, c in zip(ranks, streams, xs, counts, strict=True):
                with torch.cuda.stream(stream):  # every rank launched before any waits: they run side by side
                    a2a.heads_to_owner(x, c)
            torch.cuda.synchronize(device)
            graphs = []
            for a2a, stream, x, c in zip(ranks, streams, xs, counts, strict=True):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    a2a.heads_to_owner(x, c)
                graphs.append(graph)

            def loop(
                splits: list[torch.Tensor] = splits,
                counts: list[torch.Tensor] = counts,
                graphs: list[torch.cuda.CUDAGraph] = graphs,
                streams: list[torch.cuda.Stream] = streams,
            ) -> None:
                for split in splits:
                    for stream, c, graph in zip(streams, counts, graphs, strict=True):
                        with torch.cuda.stream(stream):
                            c.copy_(split)
                            graph.replay()

            out[(shape, batch)] = _time(loop, lambda: torch.cuda.synchronize(device))
            del graphs
    return out


def _streams_child(world: int, batches: str, queue: Any) -> None:
    queue.put(_streams_us(world, [int(b) for b in batches.split(",")]))


def plot(rows: list[dict[str, Any]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(11, 4))
    for ax, shape in zip(axes, SHAPES, strict=True):
        mine = [r for r in rows if r["shape"] == shape]
        batches = [r["batch"] for r in mine]
        for key, label in (
            ("ref_us", "reference: sizes exchanged + all_to_all_single"),
            ("ipc_eager_us", "IPC, eager"),
            ("ipc_graph_us", "IPC, CUDA graph replay"),
            ("ipc_streams_us", "IPC, graph replay, ranks as streams of one process"),
        ):
            if key in mine[0]:
                ax.plot(batches, [r[key] for r in mine], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (tokens)")
        ax.set_ylabel("µs per exchange")
        ax.set_title(f"{shape}: {mine[0]['heads_per_rank']} x {mine[0]['dim']} per token and rank")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dynamic_a2a", description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument(
        "--shared-gpu", action="store_true", help="every rank on cuda:0 (reference over gloo)"
    )
    parser.add_argument("--batches", default="8,16,32,64,128,256")
    parser.add_argument("--out", default="bench/results/dynamic_a2a_cuda.json")
    parser.add_argument("--mps", action="store_true",
                        help="with --shared-gpu: the ranks under a private CUDA MPS daemon, so their kernels run at "
                             "once (time-sliced, a kernel waiting on another rank's write waits for a context switch)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.dynamic_a2a needs CUDA GPUs")
        return 2
    if args.mps:
        from bench.gpu_mps import mps_daemon

        with mps_daemon(Path(tempfile.mkdtemp(prefix="tandem-mps-"))) as env:
            os.environ.update(env)  # the spawned ranks inherit it
            return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    path = os.path.join(tempfile.gettempdir(), f"tandem-a2a-bench-{os.getpid()}")
    procs = [ctx.Process(target=_rank, args=(r, args, path, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=900)
    for p in procs:
        p.join(60)
    if os.path.exists(path):
        os.unlink(path)
    if args.shared_gpu:  # in a child with a deadline: a barrier that never completes must not hang the bench
        child = ctx.Process(target=_streams_child, args=(args.world, args.batches, queue))
        child.start()
        child.join(300)
        if child.is_alive():
            child.kill()
            print("ranks as streams did not finish in 300 s: no ipc_streams column")
        elif not queue.empty():
            streams = queue.get()
            for r in rows:
                r["ipc_streams_us"] = streams[(r["shape"], r["batch"])]
                r["ref_over_ipc_streams"] = r["ref_us"] / r["ipc_streams_us"]
    name = torch.cuda.get_device_name(0)
    where = f"{args.world} ranks on one {name}" if args.shared_gpu else f"{args.world} x {name}"
    where += " under MPS" if args.mps else ""
    reference = "gloo via host" if args.shared_gpu else "NCCL"
    print(f"{where}; reference over {reference}; µs per exchange (median)")
    print(
        f"{'shape':<8}{'batch':>6}{'MB/rank':>9}{'ref':>10}{'ipc eager':>11}{'ipc graph':>11}{'ref/graph':>11}"
        f"{'streams':>10}{'ref/streams':>13}"
    )
    for r in rows:
        extra = (
            f"{r['ipc_streams_us']:>10.1f}{r['ref_over_ipc_streams']:>13.2f}" if "ipc_streams_us" in r else ""
        )
        print(
            f"{r['shape']:<8}{r['batch']:>6}{r['bytes_per_rank'] / 1e6:>9.2f}{r['ref_us']:>10.1f}"
            f"{r['ipc_eager_us']:>11.1f}{r['ipc_graph_us']:>11.1f}{r['ref_over_ipc_graph']:>11.2f}{extra}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": where, "reference": reference, "rows": rows}, indent=2))
    plot(rows, f"MLA-core head exchange, {where} (reference: {reference})", out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
