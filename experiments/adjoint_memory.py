"""Memory, time and backward NFE of gradients through sampling: AdjointDPM's claim, measured.

    python experiments/adjoint_memory.py            # all methods x steps 10, 50, 200, 1000 (~5-8 min on 2 cores)
    python experiments/adjoint_memory.py --quick    # steps 10 and 50 only

Setting: a small conv eps-model (4 3x3 convs, 16 channels, time embedding; ~5k params) on 8x8x1 images,
batch 8, LinearVP, float32; loss = mean(x_0^2); gradient w.r.t. x_T and all params. Every method runs the
same discretisation, 1 model call per step on the same logSNR grid (Euler in rho == DDIM):
  backsolve   diffrax BacksolveAdjoint, Euler (the paper's continuous adjoint)
  checkpoint  diffrax RecursiveCheckpointAdjoint, Euler (binomial checkpointing, checkpoints chosen by diffrax)
  scan_remat  backprop through dpmjax.sample(solver="ddim", remat=True)
  scan_plain  backprop through dpmjax.sample(solver="ddim") without remat (naive backprop: every activation kept)
Each configuration runs in its own subprocess so that the process's peak RSS (``resource.getrusage``) is its own.
Measured: XLA's compiled ``memory_analysis()`` temp size of the jitted gradient, peak RSS (and its rise over the
pre-compile baseline), compile time, the median wall time of the compiled gradient, and model calls counted by
host callbacks in that same program (forward evaluations in the forward pass, from a forward-only run; forward
evaluations and VJPs in the backward pass). Writes results/adjoint/memory.csv, memory.png and memory.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time

OUT = os.path.join("results", "adjoint")
METHODS = ("backsolve", "checkpoint", "scan_remat", "scan_plain")
STEPS = (10, 50, 200, 1000)
BATCH, SIZE, CHANNELS = 8, 8, 16


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_one(method: str, steps: int) -> dict:
    """One configuration, in this (fresh) process."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dpmjax
    from dpmjax.adjoint import generate, value_and_grad_through_sampling

    class ConvEps(nn.Module):
        @nn.compact
        def __call__(self, x, t):
            freqs = jnp.exp(jnp.linspace(0.0, 4.0, 8)).astype(x.dtype)
            emb = nn.Dense(CHANNELS)(jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1))
            h = nn.silu(nn.Conv(CHANNELS, (3, 3))(x) + emb[:, None, None, :])
            h = nn.silu(nn.Conv(CHANNELS, (3, 3))(h))
            h = nn.silu(nn.Conv(CHANNELS, (3, 3))(h))
            return nn.Conv(x.shape[-1], (3, 3))(h)

    schedule = dpmjax.LinearVP()
    net = ConvEps()
    x_T = jax.random.normal(jax.random.key(0), (BATCH, SIZE, SIZE, 1))
    params = net.init(jax.random.key(1), x_T, jnp.ones((BATCH,)))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

    def eps_model(p, x, t):  # sigma_t x is the exact eps of N(0, I) data: keeps x_0 O(1) for a random net
        return schedule.sigma(t)[:, None, None, None] * x + 0.1 * net.apply(p, x, t)

    def loss(x_0):
        return jnp.mean(x_0 ** 2)

    common = dict(schedule=schedule, num_steps=steps, spacing="logSNR")

    def make(model):
        if method == "scan_plain":
            def plain(p, x):
                def objective(p, x):
                    return loss(dpmjax.sample(lambda xx, t: model(p, xx, t, None), x, schedule=schedule,
                                              solver="ddim", nfe=steps, spacing="logSNR"))
                return jax.value_and_grad(objective, argnums=(0, 1))(p, x)
            return plain
        adjoint_method, solver = {"backsolve": ("backsolve", "euler"), "checkpoint": ("checkpoint", "euler"),
                                  "scan_remat": ("scan", "ddim")}[method]

        def adjoint(p, x):
            return value_and_grad_through_sampling(loss, model, p, x, method=adjoint_method, solver=solver,
                                                   wrt=("x_T", "params"), check_finite=False, **common)
        return adjoint

    # Model calls are counted by host callbacks inside the measured program itself (one compile per
    # configuration): a forward-evaluation tick (also fired when a rematerialised step or a diffrax
    # recomputation re-runs the model) and a VJP tick. Each tick takes a data dependency so that XLA can neither
    # hoist it out of the loop nor merge it with another; they add two host callbacks per model call to the
    # timings, the same for every method.
    counts = {"fwd": 0, "vjp": 0}

    def bump(name):
        def inc(dep):
            counts[name] += 1
        return inc

    @jax.custom_vjp
    def counted(p, x, t):
        jax.debug.callback(bump("fwd"), t[0])
        return eps_model(p, x, t)

    def counted_fwd(p, x, t):
        jax.debug.callback(bump("fwd"), t[0])
        out, vjp = jax.vjp(eps_model, p, x, t)
        return out, vjp

    def counted_bwd(vjp, g):
        jax.debug.callback(bump("vjp"), g[0, 0, 0, 0])
        return vjp(g)

    counted.defvjp(counted_fwd, counted_bwd)
    if method.startswith("scan"):
        forward = jax.jit(lambda p, x: dpmjax.sample(lambda xx, t: counted(p, xx, t), x, schedule=schedule,
                                                      solver="ddim", nfe=steps, spacing="logSNR"))
    else:
        forward = jax.jit(lambda p, x: generate(counted, p, x, method=method, solver="euler", **common)[0])
    jax.block_until_ready(forward(params, x_T))
    forward_calls = counts["fwd"]

    baseline_mb = _rss_mb()
    grad_fn = jax.jit(make(counted))
    start = time.perf_counter()
    compiled = grad_fn.lower(params, x_T).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    counts.update(fwd=0, vjp=0)
    jax.block_until_ready(compiled(params, x_T))  # warm-up, and the counted run
    grad_counts = dict(counts)
    times = []
    for _ in range(3 if steps <= 200 else 1):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x_T))
        times.append(time.perf_counter() - start)
    peak_mb = _rss_mb()
    return dict(method=method, steps=steps, num_params=num_params, temp_mb=stats.temp_size_in_bytes / 2 ** 20,
                argument_mb=stats.argument_size_in_bytes / 2 ** 20, peak_rss_mb=peak_mb,
                rss_rise_mb=peak_mb - baseline_mb, compile_s=compile_s, grad_s=float(np.median(times)),
                forward_nfe=forward_calls, backward_forward_evals=grad_counts["fwd"] - forward_calls,
                backward_vjps=grad_counts["vjp"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], int(args.one[1]))), flush=True)
        return
    steps_list = STEPS[:2] if args.quick else STEPS
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for steps in steps_list:
        for method in METHODS:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", method, str(steps)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{method} {steps}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            row = json.loads(lines[-1][len("RESULT "):])
            rows.append(row)
            print(f"{method:>10} {steps:>5} steps: temp {row['temp_mb']:8.2f} MB  "
                  f"peak RSS {row['peak_rss_mb']:7.0f} MB (+{row['rss_rise_mb']:.0f})  grad {row['grad_s']:.3f} s  "
                  f"compile {row['compile_s']:.1f} s  "
                  f"NFE fwd {row['forward_nfe']} / bwd {row['backward_forward_evals']} evals + "
                  f"{row['backward_vjps']} VJPs  ({time.perf_counter() - start:.0f} s)", flush=True)
    if not rows:
        return
    with open(os.path.join(OUT, "memory.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = ["| method | steps | XLA temp (MB) | peak RSS (MB) | RSS rise (MB) | grad wall (s) | compile (s) | "
             "fwd NFE | bwd model evals | bwd VJPs |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["steps"])):
        table.append(f"| {r['method']} | {r['steps']} | {r['temp_mb']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_rise_mb']:.0f} | {r['grad_s']:.3f} | {r['compile_s']:.1f} | {r['forward_nfe']} | "
                     f"{r['backward_forward_evals']} | {r['backward_vjps']} |")
    with open(os.path.join(OUT, "memory.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    _plot(rows)


def _plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method in METHODS:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["steps"])
        if not mine:
            continue
        steps = [r["steps"] for r in mine]
        axes[0].plot(steps, [max(r["temp_mb"], 1e-3) for r in mine], "o-", label=method)
        axes[1].plot(steps, [r["rss_rise_mb"] for r in mine], "o-", label=method)
        axes[2].plot(steps, [r["grad_s"] for r in mine], "o-", label=method)
    for ax, title in zip(axes, ("XLA temp memory (MB)", "peak RSS rise over baseline (MB)", "gradient wall time (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps (1 model call each)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "memory.png"), dpi=120)


if __name__ == "__main__":
    main()
