"""KV page transfer benchmark: NIXL / Mooncake between two processes, against a plain copy of the same bytes.

    python -m bench.kv_transfer --engine nixl|mooncake|all --device cpu|cuda[:N] [--dst-device D]
                                [--json OUT] [--quick]

A receiver process registers its own pool (on --dst-device); this process registers the source pool and
writes MLA-shaped pages (61 layers x 576 bf16 values per token by default) for every combination of engine
variant, page size, prompt length, page pattern (contiguous run / every other page) and layout (cross-layer
pages: one descriptor per run of pages; per-layer: one descriptor per layer per page, the baseline). Each
case reports the median write latency, GB/s, descriptors, and `ratio_to_memcpy`: GB/s over a plain copy of
the same number of bytes timed in this run (numpy memcpy on CPU, torch `copy_` on GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtransfer.engines import BackendUnavailable, TransferEngine, TransferStatus, make_engine
from kvtransfer.engines.staging import PageStager
from kvtransfer.layout import PageLayout, layer_descriptors, page_descriptors

MIB = 1 << 20
# Engine variants tried per engine: what lowers the per-descriptor cost. "default" is the engine's default
# (NIXL: 4 UCX threads, chosen from the GPU runs in bench/results/kv_transfer_cuda_h100_*; those files'
# "default" is the older default of 0 threads, their "threads4" today's default).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "nixl": {
        "default": {},
        "threads0": {"num_threads": 0},
        "threads8": {"num_threads": 8},
        "chunk512": {"max_descs_per_request": 512},
    },
    "mooncake": {"default": {}, "batch256": {"max_descs_per_batch": 256}},
}
QUICK_VARIANTS = {"nixl": ["default", "threads0"], "mooncake": ["default"]}


@dataclass
class Case:
    engine: str
    variant: str
    device: str
    dst_device: str
    page_size: int
    prompt_tokens: int
    pattern: str  # "contiguous" | "fragmented"
    layout: str  # "cross-layer" | "per-layer"
    pages: int
    descriptors: int
    bytes: int
    latency_ms: float = math.nan  # median write latency
    gbps: float = math.nan  # bytes / best write latency
    median_gbps: float = math.nan
    memcpy_gbps: float = math.nan  # bytes / best copy time, timed right before this case
    ratio_to_memcpy: float = math.nan
    build_ms: float = math.nan
    repeats: int = 0
    verified: bool = False
    skipped: str = ""


def _normalise_device(device: str) -> str:
    if device == "cuda":
        return "cuda:0"
    if device == "cpu" or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise SystemExit(f"--device/--dst-device must be cpu, cuda or cuda:N, got {device!r}")


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(torch.device(device))


def _alloc(nbytes: int, device: str) -> torch.Tensor:
    if device != "cpu":
        if not torch.cuda.is_available():
            raise SystemExit(f"{device} asked for but torch sees no CUDA device")
        torch.cuda.set_device(torch.device(device))
    # Zero-filled, not empty: first-touch page faults would otherwise land inside the first timed writes.
    return torch.zeros(nbytes, dtype=torch.uint8, device=device)


def _checksums(pool: torch.Tensor, base: int, ranges: list[tuple[int, int]]) -> list[int]:
    return [int(pool[a - base : a - base + n].sum(dtype=torch.int64)) for a, n in ranges]


# --- receiver process ----------------------------------------------------------------------------------


def stager(buffer: torch.Tensor, layout: PageLayout, pool_bytes: int) -> PageStager:
    """The pool's pages are the first `layout.pool_bytes` of `buffer`; staging starts at `pool_bytes`."""
    return PageStager(buffer[: layout.pool_bytes], layout, buffer[pool_bytes:])


# The receiver calls `engine.progress()` this often while it waits for a command, like a decode rank that
# only waits on transfers (decode_worker.runner naps WAIT_NAP_S between steps): NIXL without its progress
# thread completes writes into this process only while it does.
RECEIVER_PROGRESS_S = 0.0001


def receiver_main(
    conn: Connection, kind: str, name: str, options: dict[str, Any], device: str, pool_bytes: int, stage_bytes: int
) -> None:
    """Own the destination pool (+ staging after it, one registration) and an engine; answer
    ("checksum", ranges), ("scatter", layout, pages) and ("close",); progress the engine in between."""
    buffer = _alloc(pool_bytes + stage_bytes, device)
    engine = make_engine(kind, name, **options)
    engine.register(buffer.data_ptr(), buffer.numel(), device)
    conn.send((engine.metadata(), buffer.data_ptr()))
    while True:
        try:
            while not conn.poll(RECEIVER_PROGRESS_S):
                engine.progress()
            command = conn.recv()
        except EOFError:  # the benchmark process died: release and go
            command = ("close",)
        if command[0] == "checksum":
            _sync(device)
            conn.send(_checksums(buffer, buffer.data_ptr(), command[1]))
        elif command[0] == "scatter":
            stager(buffer, command[1], pool_bytes).scatter(command[2])
            conn.send(None)
        elif command[0] == "close":
            engine.close()
            try:
                conn.send(None)
            except OSError:
                pass
            return


class Receiver:
    def __init__(
        self, kind: str, name: str, device: str, pool_bytes: int, stage_bytes: int, options: dict[str, Any]
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, kind, name, options, device, pool_bytes, stage_bytes)
        self.process = ctx.Process(target=receiver_main, args=args)
        self.process.start()
        child.close()
        if not self.conn.poll(300):
            raise RuntimeError(f"{kind} receiver did not start")
        self.metadata, self.base_ptr = self.conn.recv()
        self.name = name

    def checksums(self, ranges: list[tuple[int, int]]) -> list[int]:
        self.conn.send(("checksum", ranges))
        return self.conn.recv()

    def scatter(self, layout: PageLayout, pages: list[int]) -> None:
        self.conn.send(("scatter", layout, pages))
        self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send(("close",))
            self.conn.poll(60) and self.conn.recv()
        except (EOFError, OSError):
            pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)


# --- timing ---------------------------------------------------------------------------------------------


def time_copy(pool: torch.Tensor, nbytes: int, device: str, repeats: int) -> float:
    """GB/s of the best of `repeats` plain copies of `nbytes` within `pool` (first half -> second half)."""
    src, dst = pool[:nbytes], pool[nbytes : 2 * nbytes]
    if device == "cpu":
        src_np, dst_np = src.numpy(), dst.numpy()

        def copy() -> None:
            np.copyto(dst_np, src_np)
    else:

        def copy() -> None:
            dst.copy_(src)
    samples = []
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        copy()
        _sync(device)
        if i:  # the first copy warms caches and TLBs
            samples.append(time.perf_counter() - start)
    return nbytes / min(samples) / 1e9


def write_and_wait(engine: TransferEngine, peer: str, src: np.ndarray, dst: np.ndarray) -> None:
    handle = engine.write(peer, src, dst)
    status = engine.wait(handle, timeout_s=600)
    engine.release(handle)
    if status is not TransferStatus.DONE:
        raise RuntimeError(f"write failed: {handle.error}")


def time_op(op: Callable[[], None], repeats: int, budget_s: float) -> list[float]:
    """Seconds per request, after one warm-up; stops early past `budget_s` (with at least 2 samples)."""
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        op()
        elapsed = time.perf_counter() - t0
        if i:
            samples.append(elapsed)
        if len(samples) >= 2 and time.perf_counter() - started > budget_s:
            break
    return samples


# --- the run --------------------------------------------------------------------------------------------


def pages_for(pattern: str, count: int) -> list[int]:
    return list(range(count)) if pattern == "contiguous" else list(range(0, 2 * count, 2))


def engine_options(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """Options both sides' engines get from the command line (on top of the sender's variant)."""
    if kind == "nixl":
        return {"progress_thread": True} if args.progress_thread else {}
    return {"protocol": args.mooncake_protocol} if args.mooncake_protocol != "tcp" else {}


FIXED_COST_BYTES = 4096


def time_fixed_cost(engine: TransferEngine, receiver: Receiver, src_buffer: torch.Tensor, repeats: int) -> float:
    """Median microseconds of a one-descriptor 4 KiB write, start to completion seen: the per-request cost
    that no byte count amortises (Python, the engine's request set-up, launch, completion polling)."""
    src = np.array([[src_buffer.data_ptr(), FIXED_COST_BYTES]], dtype=np.int64)
    dst = np.array([[receiver.base_ptr, FIXED_COST_BYTES]], dtype=np.int64)
    samples = time_op(lambda: write_and_wait(engine, receiver.name, src, dst), max(repeats, 50), 2.0)
    return statistics.median(samples) * 1e6


def run(args: argparse.Namespace) -> tuple[list[Case], dict[str, float]]:
    """Every case, and the fixed per-request cost in microseconds per "engine/variant"."""
    device, dst_device = _normalise_device(args.device), _normalise_device(args.dst_device or args.device)
    itemsize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    token_bytes = args.layers * args.token_dim * itemsize
    prompts = [p for p in args.prompts if p * token_bytes <= args.max_request_mib * MIB]
    dropped = sorted(set(args.prompts) - set(prompts))
    if dropped:
        print(f"skipping prompts {dropped}: over --max-request-mib {args.max_request_mib}")
    if not prompts:
        raise SystemExit("no prompt fits --max-request-mib")
    # Both pools hold twice the largest request (fragmented pages use every other page), plus a page of
    # slack for rounding prompts up to whole pages; a staging area of one request follows each pool in the
    # same registration.
    largest = max(math.ceil(p / s) * s for p in prompts for s in args.page_sizes)
    args.pool_bytes = 2 * (largest + max(args.page_sizes)) * token_bytes
    stage_bytes = largest * token_bytes
    print(f"pools: {args.pool_bytes / MIB:.0f} MiB + {stage_bytes / MIB:.0f} MiB staging, on {device} -> "
          f"{dst_device}; {token_bytes} B per token")
    src_buffer = _alloc(args.pool_bytes + stage_bytes, device)
    src_buffer.random_(0, 256)

    cases: list[Case] = []
    fixed_us: dict[str, float] = {}
    for kind in args.engines:
        variants = QUICK_VARIANTS[kind] if args.quick else list(VARIANTS[kind])
        if args.variants:
            variants = [v for v in variants if v in args.variants]
        try:
            receiver = Receiver(kind, f"bench-{kind}-dst", dst_device, args.pool_bytes, stage_bytes,
                                engine_options(args, kind))
        except BackendUnavailable as exc:
            print(f"{kind}: not available here ({exc}); skipped")
            continue
        try:
            for variant in variants:
                variant_cases, fixed_us[f"{kind}/{variant}"] = run_variant(
                    args, kind, variant, receiver, src_buffer, (device, dst_device), prompts)
                cases += variant_cases
        finally:
            receiver.close()
    return cases, fixed_us


def run_variant(
    args: argparse.Namespace,
    kind: str,
    variant: str,
    receiver: Receiver,
    src_buffer: torch.Tensor,
    devices: tuple[str, str],
    prompts: list[int],
) -> tuple[list[Case], float]:
    engine = make_engine(kind, f"bench-{kind}-{variant}-src", **VARIANTS[kind][variant], **engine_options(args, kind))
    engine.register(src_buffer.data_ptr(), src_buffer.numel(), devices[0])
    engine.connect(receiver.name, receiver.metadata)
    itemsize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    cases: list[Case] = []
    try:
        fixed_us = time_fixed_cost(engine, receiver, src_buffer, args.repeats)
        print(f"{kind}/{variant}: fixed cost of a 4 KiB one-descriptor write {fixed_us:.1f} us (median)")
        for page_size in args.page_sizes:
            shape = dict(num_layers=args.layers, page_size=page_size, token_dim=args.token_dim, itemsize=itemsize,
                         dtype=args.dtype)
            num_pages = args.pool_bytes // (args.layers * page_size * args.token_dim * itemsize)
            layouts = (PageLayout(num_pages=num_pages, base_ptr=src_buffer.data_ptr(), device=devices[0], **shape),
                       PageLayout(num_pages=num_pages, base_ptr=receiver.base_ptr, device=devices[1], **shape))
            for prompt in prompts:
                count = math.ceil(prompt / page_size)
                for pattern in ("contiguous", "fragmented"):
                    pages = pages_for(pattern, count)
                    names = ["cross-layer", "per-layer"] + (["staged"] if pattern == "fragmented" else [])
                    for layout_name in names:
                        # Timed next to each case: on a shared machine the copy speed drifts with load.
                        copy_gbps = time_copy(src_buffer, count * layouts[0].page_bytes, devices[0], args.repeats)
                        case = one_case(args, engine, receiver, src_buffer, layouts, pages,
                                        (kind, variant, pattern, layout_name), prompt, copy_gbps)
                        cases.append(case)
                        print_row(case)
    finally:
        engine.close()
    return cases, fixed_us


def one_case(
    args: argparse.Namespace,
    engine: TransferEngine,
    receiver: Receiver,
    src_buffer: torch.Tensor,
    layouts: tuple[PageLayout, PageLayout],
    pages: list[int],
    labels: tuple[str, str, str, str],
    prompt: int,
    memcpy_gbps: float,
) -> Case:
    """One (pattern, layout) case: "cross-layer" (a descriptor per run of pages), "per-layer" (one per layer
    per page) or "staged" (gather into staging, one descriptor, scatter on the receiver)."""
    kind, variant, pattern, layout_name = labels
    src_layout, dst_layout = layouts
    t0 = time.perf_counter()
    count = len(pages) * src_layout.num_layers if layout_name == "per-layer" else 1
    case = Case(kind, variant, src_layout.device, dst_layout.device, src_layout.page_size, prompt, pattern,
                layout_name, len(pages), count, len(pages) * src_layout.page_bytes, memcpy_gbps=memcpy_gbps)
    if count > args.max_descriptors:
        case.skipped = f"{count} descriptors > --max-descriptors {args.max_descriptors}"
        return case
    if layout_name == "staged":
        pool_bytes = args.pool_bytes
        src_stager = stager(src_buffer, src_layout, pool_bytes)
        dst = np.array([[receiver.base_ptr + pool_bytes, case.bytes]], dtype=np.int64)

        def op() -> None:
            addr, nbytes = src_stager.gather(pages)
            write_and_wait(engine, receiver.name, np.array([[addr, nbytes]], dtype=np.int64), dst)
            receiver.scatter(dst_layout, pages)
    else:
        build = page_descriptors if layout_name == "cross-layer" else layer_descriptors
        src_list, dst_list = build(src_layout, pages, dst_layout, pages)
        src, dst = np.asarray(src_list, dtype=np.int64), np.asarray(dst_list, dtype=np.int64)
        case.descriptors = len(src)

        def op() -> None:
            write_and_wait(engine, receiver.name, src, dst)
    case.build_ms = (time.perf_counter() - t0) * 1e3
    samples = time_op(op, args.repeats, args.case_budget_s)
    case.repeats = len(samples)
    case.latency_ms = statistics.median(samples) * 1e3
    case.median_gbps = case.bytes / statistics.median(samples) / 1e9
    # Best against best: both sides see the same machine at its least disturbed.
    case.gbps = case.bytes / min(samples) / 1e9
    case.ratio_to_memcpy = case.gbps / memcpy_gbps
    # Spot-check the first and last pages on both sides: a fast no-op would show here.
    span = min(src_layout.page_bytes, 1 << 20)
    probe = [(src_layout.page_addr(p), span) for p in (pages[0], pages[-1])]
    probe_dst = [(dst_layout.page_addr(p), span) for p in (pages[0], pages[-1])]
    _sync(src_layout.device)
    case.verified = _checksums(src_buffer, src_buffer.data_ptr(), probe) == receiver.checksums(probe_dst)
    if not case.verified:
        print(f"!! destination bytes differ from the source in {kind}/{variant} {pattern} {layout_name}")
    return case


# --- output ---------------------------------------------------------------------------------------------

HEADER = (
    f"{'engine':<9}{'variant':<10}{'page':>5}{'tokens':>7} {'pattern':<11}{'layout':<12}{'descs':>7}"
    f"{'MiB':>8}{'ms':>9}{'GB/s':>8}{'copy':>7}{'ratio':>7}"
)


def print_row(case: Case) -> None:
    if case.skipped:
        print(f"{case.engine:<9}{case.variant:<10}{case.page_size:>5}{case.prompt_tokens:>7} {case.pattern:<11}"
              f"{case.layout:<12}  skipped: {case.skipped}")
        return
    flag = "" if case.verified else "  MISMATCH"
    print(f"{case.engine:<9}{case.variant:<10}{case.page_size:>5}{case.prompt_tokens:>7} {case.pattern:<11}"
          f"{case.layout:<12}{case.descriptors:>7}{case.bytes / MIB:>8.1f}{case.latency_ms:>9.2f}"
          f"{case.gbps:>8.2f}{case.memcpy_gbps:>7.1f}{case.ratio_to_memcpy:>7.2f}{flag}", flush=True)


def _gains(cases: list[Case], better: str, baseline: str) -> dict[str, float]:
    """GB/s of layout `better` over layout `baseline`, over every case measured with both."""
    key = lambda c: (c.variant, c.page_size, c.prompt_tokens, c.pattern)  # noqa: E731
    base = {key(c): c.gbps for c in cases if c.layout == baseline}
    ratios = [c.gbps / base[key(c)] for c in cases if c.layout == better and key(c) in base]
    if not ratios:
        return {}
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios), "pairs": len(ratios)}


def summarise(cases: list[Case]) -> dict[str, Any]:
    """Per engine: the best case, the best per variant, and layout gains (cross-layer over per-layer,
    staged over cross-layer on fragmented pages)."""
    done = [c for c in cases if not c.skipped]
    summary: dict[str, Any] = {}
    for kind in sorted({c.engine for c in done}):
        mine = [c for c in done if c.engine == kind]
        best = max(mine, key=lambda c: c.ratio_to_memcpy)
        per_variant = {}
        for variant in sorted({c.variant for c in mine}):
            ratios = [c.ratio_to_memcpy for c in mine if c.variant == variant and c.layout != "per-layer"]
            per_variant[variant] = {"median_ratio_to_memcpy": statistics.median(ratios) if ratios else math.nan}
        summary[kind] = {
            "best": asdict(best),
            "variants": per_variant,
            "cross_layer_over_per_layer": _gains(mine, "cross-layer", "per-layer"),
            "staged_over_cross_layer": _gains(mine, "staged", "cross-layer"),
            "all_verified": all(c.verified for c in mine),
        }
    return summary


def write_outputs(path: Path, args: argparse.Namespace, cases: list[Case], fixed_us: dict[str, float]) -> None:
    meta = {
        "argv": sys.argv[1:],
        "device": args.device,
        "dst_device": args.dst_device or args.device,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "layers": args.layers,
        "token_dim": args.token_dim,
        "dtype": args.dtype,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("UCX_", "MC_", "NIXL_"))},
        "variants": {k: VARIANTS[k] for k in args.engines},
        "engine_options": {k: engine_options(args, k) for k in args.engines},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta, "summary": summarise(cases), "fixed_cost_us": fixed_us, "cases": [asdict(c) for c in cases]}
    path.write_text(json.dumps(body, indent=1, allow_nan=True))
    plot(path.with_suffix(".png"), cases, meta)
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(path: Path, cases: list[Case], meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in cases if not c.skipped]
    rows = sorted({(c.engine, c.variant) for c in done})
    page_sizes = sorted({c.page_size for c in done})
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), len(page_sizes), figsize=(4.2 * len(page_sizes), 3.0 * len(rows)),
                             squeeze=False, sharey=True)
    styles = {("contiguous", "cross-layer"): "C0-o", ("fragmented", "cross-layer"): "C1-o",
              ("contiguous", "per-layer"): "C0:x", ("fragmented", "per-layer"): "C1:x",
              ("fragmented", "staged"): "C2--s"}
    for r, (engine, variant) in enumerate(rows):
        for col, page in enumerate(page_sizes):
            ax = axes[r][col]
            for (pattern, layout), style in styles.items():
                pts = sorted((c.prompt_tokens, c.ratio_to_memcpy) for c in done if (c.engine, c.variant, c.page_size,
                             c.pattern, c.layout) == (engine, variant, page, pattern, layout))
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{pattern}, {layout}")
            ax.set_xscale("log", base=2)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{engine}/{variant}, {page}-token pages", fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel("prompt tokens")
            if col == 0:
                ax.set_ylabel("ratio to memcpy")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"KV page writes {meta['device']} -> {meta['dst_device']}, {meta['layers']} layers x "
                 f"{meta['token_dim']} {meta['dtype']} per token", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="all", choices=["nixl", "mooncake", "all"])
    parser.add_argument("--device", default="cpu", help="source pool: cpu, cuda or cuda:N")
    parser.add_argument("--dst-device", default=None, help="destination pool (default: same as --device)")
    parser.add_argument("--json", type=Path, default=None, help="write every case here, and a PNG beside it")
    parser.add_argument("--quick", action="store_true", help="a short run: 1k/4k prompts, 16/64-token pages")
    parser.add_argument("--replot", type=Path, default=None, help="redraw the PNG of an earlier --json file")
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--token-dim", type=int, default=576, help="values per token per layer")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--page-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--prompts", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=None,
                        help="engine variants to run (names from VARIANTS); default all")
    parser.add_argument("--mooncake-protocol", default="tcp",
                        help="Mooncake transport on both sides: tcp, rdma, nvlink_intra (GPUs of one host), ...")
    parser.add_argument("--progress-thread", action="store_true",
                        help="NIXL: run the agents' progress thread (spins a core each; off by default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed writes per case, after one warm-up")
    parser.add_argument("--case-budget-s", type=float, default=2.0, help="stop repeating a case after this")
    parser.add_argument("--max-request-mib", type=int, default=None,
                        help="skip prompts whose KV exceeds this (default: 600 on CPU, 4096 on GPU)")
    parser.add_argument("--max-descriptors", type=int, default=None,
                        help="skip cases with more descriptors (default: 65536 on CPU, 300000 on GPU)")
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu" and (args.dst_device or "cpu") == "cpu"
    if args.quick:
        args.prompts, args.page_sizes = [1024, 4096], [16, 64]
        args.repeats, args.case_budget_s = min(args.repeats, 3), 0.5
    if args.max_request_mib is None:
        args.max_request_mib = 600 if on_cpu else 4096
    if args.max_descriptors is None:
        args.max_descriptors = 65536 if on_cpu else 300_000
    args.engines = ["nixl", "mooncake"] if args.engine == "all" else [args.engine]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        body = json.loads(args.replot.read_text())
        plot(args.replot.with_suffix(".png"), [Case(**c) for c in body["cases"]], body["meta"])
        return
    started = time.perf_counter()
    print(HEADER)
    cases, fixed_us = run(args)
    measured = [c for c in cases if not c.skipped]
    print(f"{len(measured)} cases measured, {len(cases) - len(measured)} skipped, "
          f"{time.perf_counter() - started:.0f} s")
    for kind, info in summarise(cases).items():
        best = info["best"]
        print(f"{kind}: best {best['gbps']:.2f} GB/s = {best['ratio_to_memcpy']:.2f}x memcpy "
              f"({best['variant']}, {best['page_size']}-token pages, {best['prompt_tokens']} tokens, "
              f"{best['pattern']}, {best['layout']}); verified: {info['all_verified']}")
        for name in ("cross_layer_over_per_layer", "staged_over_cross_layer"):
            gain = info[name]
            if gain:
                print(f"  {name}: median {gain['median']:.2f}x (min {gain['min']:.2f}, max {gain['max']:.2f})")
        print("  median ratio_to_memcpy per variant (cross-layer and staged cases): " + ", ".join(
            f"{v} {d['median_ratio_to_memcpy']:.2f}" for v, d in info["variants"].items()))
    if args.json:
        write_outputs(args.json, args, cases, fixed_us)


if __name__ == "__main__":
    main()
