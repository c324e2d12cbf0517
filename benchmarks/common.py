"""Shared helpers for the benchmark scripts: timing and compiled-cost readouts."""

from __future__ import annotations

import statistics
import time

import jax

from lora_jax.demo.loop import peak_bytes


def compiled_stats(jitted, *args):
    """(compiled, flops, peak bytes) of a jitted function for these arguments."""
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    return compiled, flops, peak_bytes(compiled)


def time_steps(step, state, n_warmup=2, n_steps=7, extra=()):
    """Median seconds per call of ``state = step(*state, *extra)`` after warm-up.

    ``state`` is what the step returns (and may donate); ``extra`` are inputs it only reads
    (the frozen base, the batch), so they are never copied into the outputs.
    """
    for _ in range(n_warmup):
        state = step(*state, *extra)
        jax.block_until_ready(state)
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        state = step(*state, *extra)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), state


def time_interleaved(runs, n_warmup=2, n_steps=7):
    """Median seconds per call of each ``(step, state, extra)``, timed round-robin.

    One step of each variant per round, so a change in machine load during the run hits all
    variants alike; ratios of these medians are steadier than of back-to-back timings.
    """
    states = [state for _, state, _ in runs]
    times = [[] for _ in runs]
    for i in range(n_warmup + n_steps):
        for j, (step, _, extra) in enumerate(runs):
            t0 = time.perf_counter()
            states[j] = step(*states[j], *extra)
            jax.block_until_ready(states[j])
            if i >= n_warmup:
                times[j].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def fmt_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
