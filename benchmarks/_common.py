"""Shared helpers of the CPU benchmarks: flags, interleaved timing, Markdown tables and JSON reports.

Every script measures the quantities it compares side by side in one run: the callables are
timed round-robin (one sample of each per round, in a shuffled order), so that a change of load
on the machine hits all of them alike, and each time reported is the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Parser with the flags every benchmark shares; the script adds its size flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that takes seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help=f"machine-readable report (default: {RESULTS_DIR.name}/{name}.json, {name}.quick.json with --quick)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    return parser


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Apply --threads and --seed; return the machine description (load average taken now, before the run)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": _load_average(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def describe(machine: dict[str, Any]) -> str:
    """One line naming the machine, for the printed summary."""
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    return (
        f"{machine['cpu']}, {machine['cpu_count']} CPUs{gpu}, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), transformers {machine['transformers']}"
    )


def progress(total: int, desc: str, disable: bool = False) -> tqdm:
    """A tqdm bar on stderr that disappears when done, so the printed tables stay clean."""
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


def sync() -> None:
    """Wait for the GPU's queued work, so that a clock read next counts it (a no-op when CUDA is unused)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    bar: tqdm | None = None,
    prime: bool = True,
    cpu_times: dict[str, list[float]] | None = None,
    setups: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every callable, timed round-robin: ``warmup`` untimed rounds, then ``repeats`` timed.

    Every round calls the callables in a new (seeded) random order, so none is always the one that
    follows a heavy neighbour. With ``prime``, each timed call directly follows one untimed call of
    the same callable, so every sample starts warm (threads awake, caches filled).
    Runs under ``torch.inference_mode``. With ``cpu_times`` (a dict), the thread CPU time of every timed call
    goes there too (steadier than wall time on a shared machine when torch runs one thread). ``setups`` (by
    name, optional) run untimed before every call of their callable (e.g. restore a cache the call consumes).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    with torch.inference_mode():
        for round_idx in range(warmup + repeats):
            shuffle(order)
            for name in order:
                fn, setup = fns[name], (setups or {}).get(name)
                if prime:
                    if setup is not None:
                        setup()
                    fn()
                if setup is not None:
                    setup()
                sync()
                start, cpu_start = time.perf_counter(), time.thread_time()
                fn()
                sync()
                elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
                if round_idx >= warmup:
                    times[name].append(elapsed)
                    if cpu_times is not None:
                        cpu_times.setdefault(name, []).append(cpu)
                if bar is not None:
                    bar.update(1)
    return times


def median_ms(times: Sequence[float]) -> float:
    """Median of times in seconds, in milliseconds."""
    return 1e3 * statistics.median(times)


def verdict(value: float, goal: str, target: float) -> str:
    """'met' or 'not met' for the goal ``value <goal> target``, goal one of '<=', '>=', '=='."""
    ok = {"<=": value <= target, ">=": value >= target, "==": value == target}[goal]
    return "met" if ok else "not met"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (it pastes into docs/benchmarks.md as is); floats get 3 significant digits."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    cells = [[cell(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(xs: Sequence[str]) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_report(name: str, args: argparse.Namespace, machine: dict[str, Any], results: dict[str, Any]) -> Path:
    """Write the JSON report (settings, machine, results) to --json or its default; return the path."""
    path = args.json or RESULTS_DIR / (f"{name}.quick.json" if args.quick else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    machine = {**machine, "load_average_at_end": _load_average()}
    payload = {"benchmark": name, "settings": settings, "machine": machine, "results": results}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nJSON report: {path}")
    return path


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
