"""Shared timing helpers: interleave the paths being compared (minimum and median of several rounds); count calls."""

import contextlib
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


@contextlib.contextmanager
def count_forward_calls(module, weight=lambda args, kwargs: 1):
    """Count `module.forward` calls inside the block: yields a one-item list, the running sum of `weight(args, kwargs)`
    over the calls (1 each by default: network evaluations). The class's `forward` is restored on exit."""
    total = [0]
    forward = module.forward

    def counting(*args, **kwargs):
        total[0] += weight(args, kwargs)
        return forward(*args, **kwargs)

    module.forward = counting
    try:
        yield total
    finally:
        del module.forward
