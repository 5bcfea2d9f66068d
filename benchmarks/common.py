"""Helpers shared by the benchmark scripts: machine description, timing, peak memory, markdown tables."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DOCS_DIR = BENCH_DIR.parent / "docs"
# the tiny offline pipelines are test helpers (tests/tiny_models.py) that the benchmarks share
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))


def setup_threads(threads: int = 1) -> None:
    """Pins torch to ``threads`` threads (the tables are single-threaded: on a shared 2-core machine two
    threads can be far slower than one)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # parallel work has already started in this process
        pass


def _meminfo_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> str:
    """One line describing the machine: CPU, cores visible, threads used, memory, torch version."""
    return (
        f"{_cpu_model()}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}, "
        f"{_meminfo_total_gib():.0f} GiB RAM, Python {platform.python_version()}, torch {torch.__version__}"
    )


def best_time(fn: Callable[[], Any], repeats: int = 3, min_seconds: float = 0.0) -> float:
    """The fastest of ``repeats`` wall-clock timings of ``fn()`` (seconds); runs at least ``min_seconds``
    in total. The minimum is the least disturbed by other processes on a shared machine."""
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def paired_best_times(functions: Sequence[Callable[[], Any]], repeats: int = 3) -> list[float]:
    """:func:`best_time` of each function, their runs interleaved (a, b, a, b, ...), so that a change in the
    machine's load during the measurement reaches every function alike."""
    times = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, fn in enumerate(functions):
            start = time.perf_counter()
            fn()
            times[index] = min(times[index], time.perf_counter() - start)
    return times


def status_kib(field: str) -> int | None:
    """A field of Linux's ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``, ``RssAnon``...); ``None`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _child_peak(fn: Callable[[], Any], connection) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # glibc keeps freed blocks resident and raises its mmap threshold dynamically, so an allocation that
        # reuses freed memory would not show in the peak: fix the threshold (M_MMAP_THRESHOLD = -3) at 1 MiB.
        libc.mallopt(-3, 1 << 20)
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = status_kib("VmRSS")
        fn()
        connection.send(max(status_kib("VmHWM") - before, 0) * 1024)
    except Exception:  # noqa: BLE001 - any failure means "not measurable here"
        connection.send(None)


def peak_memory_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak resident memory added while ``fn()`` runs once (bytes), measured in a forked child (which sees the
    parent's tensors without copying them) from Linux's VmHWM after a reset through ``/proc/self/clear_refs``;
    ``None`` where that is unavailable. Timings stay in the parent, whose allocator is left alone."""
    import multiprocessing

    try:
        context = multiprocessing.get_context("fork")
    except ValueError:
        return None
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_peak, args=(fn, sender))
    child.start()
    result = receiver.recv() if receiver.poll(600) else None
    child.join()
    return result


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(name: str, sections: Sequence[tuple[str, str]], quick: bool, results_dir: Path | None = None) -> Path:
    """Prints the report and writes it to ``{results_dir}/{name}[-quick].md`` (default ``benchmarks/results``)."""
    results_dir = results_dir or RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}{'-quick' if quick else ''}.md"
    text = f"# {name}{' (--quick)' if quick else ''}\n\nMachine: {machine_info()}\n"
    for title, body in sections:
        text += f"\n## {title}\n\n{body}\n"
    path.write_text(text)
    print(text)
    print(f"written to {path}")
    return path


def plot_path(name: str, quick: bool, results_dir: Path | None = None) -> Path:
    """Where a plot goes: ``docs/{name}.png`` for full runs, ``benchmarks/results/{name}-quick.png`` for quick
    ones (so a CI run does not overwrite the committed figures), or ``results_dir`` when one is given."""
    if results_dir is not None or quick:
        directory = results_dir or RESULTS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{name}{'-quick' if quick else ''}.png"
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    return DOCS_DIR / f"{name}.png"


def add_common_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """``--quick``, ``--threads`` and ``--results-dir``, shared by every benchmark script."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="write the report and plot here instead of benchmarks/results and docs/")
