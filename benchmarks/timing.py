"""Shared timing helper: interleave the paths being compared, report the minimum and median of several rounds."""

import statistics
import time

import torch


def interleaved(fns: dict, rounds: int = 7, warmup: int = 2) -> dict:
    """Run each callable `warmup` times, then `rounds` rounds in interleaved order; return {name: (min_s, median_s)}.

    Interleaving makes the comparison fair on a noisy shared machine: every path sees the same background load.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def header(title: str) -> None:
    print(f"\n{title}\n(torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu)")
