"""Sampler overhead: wall time of jitted ``dpmjax`` sampling vs NFE x (one jitted model call), beside diffusers.

    python experiments/sampler_overhead.py            # batch 64 (see BENCHMARKS.md), NFE 10 and 20
    python experiments/sampler_overhead.py --quick    # smoke run

For each model -- (a) a trivial elementwise model, (b) a small conv UNet (flax.linen, 2 resolutions,
channels 32/64, GroupNorm, time embedding, ~0.4M parameters, 32x32x3 input) -- and each solver
(dpmpp_2m, unipc, pndm, dpm_solver_3) at NFE 10 and 20 it reports
    overhead = (T_sampler - NFE * T_model) / (NFE * T_model),
T_model = one jitted model call, plus the same against a bare ``lax.scan`` of NFE model calls (what a loop
of model calls alone costs when compiled). Times: median of ``--repeats`` runs after a warm-up (which
compiles), ``block_until_ready``; float32 on the CPU.
diffusers: the same 2-resolution UNet written in torch, run by ``DPMSolverMultistepScheduler`` (its
default dpmsolver++ 2M) in a Python loop, and the scheduler loop with a trivial torch model, giving the
per-step cost of ``scheduler.step``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np


import flax.linen as nn  # noqa: E402

import dpmjax  # noqa: E402
from dpmjax.schedules import DiscreteVP  # noqa: E402

SOLVERS = ("dpmpp_2m", "unipc", "pndm", "dpm_solver_3")
NFES = (10, 20)


# ------------------------------------------------------------------------------------------------
# Models.
# ------------------------------------------------------------------------------------------------

def sinusoidal(t, dim):
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (1000.0 * t)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ResBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x, temb):
        h = nn.swish(nn.GroupNorm(num_groups=8)(x))
        h = nn.Conv(self.channels, (3, 3))(h)
        h = h + nn.Dense(self.channels)(temb)[:, None, None, :]
        h = nn.swish(nn.GroupNorm(num_groups=8)(h))
        h = nn.Conv(self.channels, (3, 3))(h)
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1))(x)
        return x + h


class SmallUNet(nn.Module):
    """32x32 -> 16x16 -> 32x32 UNet, channels 32/64, GroupNorm, sinusoidal time embedding (NHWC)."""

    @nn.compact
    def __call__(self, x, t):
        temb = nn.Dense(128)(nn.swish(nn.Dense(128)(sinusoidal(t, 64))))
        h1 = ResBlock(32)(nn.Conv(32, (3, 3))(x), temb)                 # 32x32x32
        h = nn.Conv(64, (3, 3), strides=(2, 2))(h1)                     # 16x16x64
        for _ in range(3):
            h = ResBlock(64)(h, temb)
        h = jax.image.resize(h, (h.shape[0], 32, 32, 64), "nearest")
        h = nn.Conv(32, (3, 3))(h)
        h = ResBlock(32)(jnp.concatenate([h, h1], axis=-1), temb)
        return nn.Conv(x.shape[-1], (3, 3))(nn.swish(nn.GroupNorm(num_groups=8)(h)))


def torch_unet():
    """The same architecture in PyTorch (NCHW), for diffusers' loop."""
    import torch
    from torch import nn as tnn

    class TResBlock(tnn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.n1, self.c1 = tnn.GroupNorm(8, cin), tnn.Conv2d(cin, cout, 3, padding=1)
            self.d = tnn.Linear(128, cout)
            self.n2, self.c2 = tnn.GroupNorm(8, cout), tnn.Conv2d(cout, cout, 3, padding=1)
            self.skip = tnn.Conv2d(cin, cout, 1) if cin != cout else tnn.Identity()

        def forward(self, x, temb):
            h = self.c1(tnn.functional.silu(self.n1(x))) + self.d(temb)[:, :, None, None]
            h = self.c2(tnn.functional.silu(self.n2(h)))
            return self.skip(x) + h

    class TUNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.t1, self.t2 = tnn.Linear(64, 128), tnn.Linear(128, 128)
            self.cin, self.r1 = tnn.Conv2d(3, 32, 3, padding=1), TResBlock(32, 32)
            self.down = tnn.Conv2d(32, 64, 3, stride=2, padding=1)
            self.mid = tnn.ModuleList([TResBlock(64, 64) for _ in range(3)])
            self.up = tnn.Conv2d(64, 32, 3, padding=1)
            self.r2 = TResBlock(64, 32)
            self.nout, self.cout = tnn.GroupNorm(8, 32), tnn.Conv2d(32, 3, 3, padding=1)

        def forward(self, x, t):
            half = 32
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
            args = t.float()[:, None] * freqs[None]
            temb = self.t2(tnn.functional.silu(self.t1(torch.cat([args.sin(), args.cos()], -1))))
            h1 = self.r1(self.cin(x), temb)
            h = self.down(h1)
            for block in self.mid:
                h = block(h, temb)
            h = self.up(tnn.functional.interpolate(h, scale_factor=2, mode="nearest"))
            h = self.r2(torch.cat([h, h1], 1), temb)
            return self.cout(tnn.functional.silu(self.nout(h)))

    return TUNet().eval()


# ------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------

def measure_interleaved(programs, repeats):
    """Run each zero-argument program ``repeats`` times, interleaved (A B C A B C ...) so that load drift on a
    shared machine hits all alike. Returns {name: (min wall s, median wall s, min CPU s)}; CPU time is the
    process's (all threads), which contention on a shared machine does not inflate."""
    walls = {name: [] for name in programs}
    cpus = {name: [] for name in programs}
    for _ in range(repeats):
        for name, fn in programs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            if isinstance(out, jax.Array):
                out.block_until_ready()
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
    return {name: (min(walls[name]), statistics.median(walls[name]), min(cpus[name])) for name in programs}


def compiled(fn, *args):
    """AOT-compile a jitted function for these arguments (no execution): (callable, compile seconds)."""
    t0 = time.perf_counter()
    exe = fn.lower(*args).compile()
    return (lambda: exe(*args)), time.perf_counter() - t0


def bench_jax(model_name, model_fn, x_T, schedule, solvers, nfes, repeats, log):
    """dpmjax samplers vs NFE x (one jitted model call) and vs a bare scan of NFE model calls."""
    batch = x_T.shape[0]
    t_vec = jnp.full((batch,), 0.5, jnp.float32)
    call, _ = compiled(jax.jit(model_fn), x_T, t_vec)
    one = measure_interleaved({"model": call}, max(repeats, 5))["model"]
    log(f"[jax {model_name}] one model call: min {one[0] * 1e3:.2f} ms (CPU {one[2] * 1e3:.2f} ms)")
    rows = []
    for nfe in nfes:
        ts = jnp.linspace(1.0, 0.001, nfe, dtype=jnp.float32)

        @jax.jit
        def bare(x):  # NFE model calls in a scan, feeding each output back (nothing else)
            def body(x, t):
                return x + 0.01 * model_fn(x, jnp.broadcast_to(t, (batch,))), None
            return jax.lax.scan(body, x, ts)[0]

        programs, compile_s = {}, {}
        programs["bare scan"], compile_s["bare scan"] = compiled(bare, x_T)
        for solver in solvers:
            try:
                fn = dpmjax.make_sampler(model_fn, schedule=schedule, solver=solver, nfe=nfe)
            except ValueError as err:
                rows.append(dict(model=model_name, solver=solver, nfe=nfe, status=f"n/a: {err}"[:160]))
                log(f"[jax {model_name}] {solver} NFE {nfe}: n/a ({err})")
                continue
            programs[solver], compile_s[solver] = compiled(fn, x_T)
        res = measure_interleaved(programs, repeats)
        bare_t = res["bare scan"]
        log(f"[jax {model_name}] NFE {nfe}: bare scan min {bare_t[0] * 1e3:.1f} ms (CPU {bare_t[2] * 1e3:.1f} ms)")
        for solver in programs:
            if solver == "bare scan":
                continue
            wall, med, cpu = res[solver]
            row = dict(model=model_name, solver=solver, nfe=nfe, t_model_ms=one[0] * 1e3, t_sampler_ms=wall * 1e3,
                       t_sampler_median_ms=med * 1e3, t_bare_scan_ms=bare_t[0] * 1e3,
                       overhead=(wall - nfe * one[0]) / (nfe * one[0]),
                       overhead_vs_bare_scan=(wall - bare_t[0]) / bare_t[0],
                       overhead_cpu=(cpu - nfe * one[2]) / (nfe * one[2]),
                       per_step_us=(wall - bare_t[0]) / nfe * 1e6, compile_s=compile_s[solver], status="ok")
            rows.append(row)
            log(f"[jax {model_name}] {solver} NFE {nfe}: min {wall * 1e3:.1f} ms (median {med * 1e3:.1f}; compile "
                f"{compile_s[solver]:.1f} s); overhead vs NFE x model {100 * row['overhead']:+.1f}% (CPU time "
                f"{100 * row['overhead_cpu']:+.1f}%), vs bare scan {100 * row['overhead_vs_bare_scan']:+.1f}%")
    return rows


def bench_diffusers(model_name, model, x, nfes, repeats, log):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++ 2M) loop vs NFE x (one torch model call)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    rows = []
    t_vec = torch.full((x.shape[0],), 500.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")

    def loop(nfe):
        scheduler.set_timesteps(nfe)
        sample = x
        for t in scheduler.timesteps:
            sample = scheduler.step(model(sample, t.expand(sample.shape[0])), t, sample).prev_sample
        return sample

    with torch.no_grad():
        model(x, t_vec)  # warm-up
        one = measure_interleaved({"model": lambda: model(x, t_vec)}, max(repeats, 5))["model"]
        log(f"[torch {model_name}] one model call: min {one[0] * 1e3:.2f} ms (CPU {one[2] * 1e3:.2f} ms)")
        for nfe in nfes:
            loop(nfe)  # warm-up
            wall, med, cpu = measure_interleaved({"loop": lambda: loop(nfe)}, repeats)["loop"]
            row = dict(model=model_name, solver="diffusers DPMSolverMultistep (2M)", nfe=nfe,
                       t_model_ms=one[0] * 1e3, t_sampler_ms=wall * 1e3, t_sampler_median_ms=med * 1e3,
                       overhead=(wall - nfe * one[0]) / (nfe * one[0]),
                       overhead_cpu=(cpu - nfe * one[2]) / (nfe * one[2]),
                       per_step_us=(wall - nfe * one[0]) / nfe * 1e6, status="ok")
            steps = step_times(scheduler, model, x, nfe, repeats)
            row.update(step_median_us=statistics.median(steps) * 1e6, step_min_us=min(steps) * 1e6)
            rows.append(row)
            log(f"[torch {model_name}] scheduler.step alone: median {row['step_median_us']:.0f} us, min "
                f"{row['step_min_us']:.0f} us")
            log(f"[torch {model_name}] DPMSolverMultistep NFE {nfe}: min {wall * 1e3:.1f} ms (median "
                f"{med * 1e3:.1f}); overhead {100 * row['overhead']:+.1f}% (CPU time "
                f"{100 * row['overhead_cpu']:+.1f}%), {row['per_step_us']:.0f} us/step beyond the model")
    return rows


def step_times(scheduler, model, x, nfe, repeats):
    """Wall time of each ``scheduler.step`` call alone (the model call excluded), over ``repeats`` loops."""
    out = []
    for _ in range(repeats):
        scheduler.set_timesteps(nfe)
        sample = x
        for t in scheduler.timesteps:
            eps = model(sample, t.expand(sample.shape[0]))
            t0 = time.perf_counter()
            sample = scheduler.step(eps, t, sample).prev_sample
            out.append(time.perf_counter() - t0)
    return out


def machine():
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    except OSError:
        name = platform.processor()
    return f"{name}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each program (after a warm-up)")
    parser.add_argument("--nfes", type=int, nargs="*", default=NFES)
    parser.add_argument("--solvers", nargs="*", default=SOLVERS)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--out", default=os.path.join("results", "sampler_overhead"))
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.nfes = 4, 1, (10,)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    log(machine())
    schedule = DiscreteVP.from_name("linear")
    x_T = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3), jnp.float32)
    unet = SmallUNet()
    params = unet.init(jax.random.key(1), x_T[:1], jnp.ones((1,), jnp.float32))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    log(f"flax UNet: {n_params / 1e6:.3f} M parameters; batch {args.batch}")

    def unet_fn(x, t):
        return unet.apply(params, x, t)

    def trivial_fn(x, t):
        return x * (0.5 + 0.1 * t)[:, None, None, None]

    rows = []
    rows += bench_jax("trivial", trivial_fn, x_T, schedule, args.solvers, args.nfes, 5 * args.repeats, log)
    rows += bench_jax("unet", unet_fn, x_T, schedule, args.solvers, args.nfes, args.repeats, log)
    if not args.no_diffusers:
        import torch

        tmodel = torch_unet()
        n_t = sum(p.numel() for p in tmodel.parameters())
        log(f"torch UNet: {n_t / 1e6:.3f} M parameters; torch threads {torch.get_num_threads()}")
        xt = torch.randn(args.batch, 3, 32, 32)
        rows += bench_diffusers("trivial", lambda x, t: x * 0.5, xt, args.nfes, 5 * args.repeats, log)
        rows += bench_diffusers("unet", tmodel, xt, args.nfes, args.repeats, log)
    add_additive_estimates(rows)
    total = time.perf_counter() - start
    with open(os.path.join(args.out, "sampler_overhead.json"), "w") as fh:
        json.dump(dict(machine=machine(), batch=args.batch, repeats=args.repeats, params=n_params,
                       total_s=total, rows=rows), fh, indent=1)
    print(table(rows))
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(table(rows) + "\n")
    log(f"total {total:.0f} s; wrote {args.out}")


def add_additive_estimates(rows):
    """Overhead of each UNet run estimated as (per-step solver cost measured with the trivial model) / (one
    UNet call): the solver's own work does not depend on the model, and the trivial-model runs are short
    enough to repeat many times, so this is far less exposed to load noise than the direct UNet timing.
    For diffusers the per-step cost is the median time of ``scheduler.step`` alone."""
    trivial = {(r["solver"], r["nfe"]): r for r in rows if r["model"] == "trivial" and r.get("status") == "ok"}
    for r in rows:
        t = trivial.get((r["solver"], r["nfe"]))
        if r["model"] == "unet" and r.get("status") == "ok" and t is not None:
            # diffusers: the measured scheduler.step time; dpmjax: trivial-model sampler minus its bare scan
            per_step = t["step_median_us"] if "step_median_us" in t else max(t["per_step_us"], 0.0)
            r["overhead_additive"] = per_step * 1e-6 / (r["t_model_ms"] * 1e-3)


def table(rows):
    lines = ["| model | sampler | NFE | model call (ms) | in a scan (ms) | sampler, min (ms) | "
             "overhead vs NFE x model | same, CPU time | vs bare scan | per step beyond bare scan / model (us) | additive estimate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['solver']} | {r['nfe']} | – | – | {r['status'][:40]} |"
                         + " – |" * 5)
            continue
        bare = f"{100 * r['overhead_vs_bare_scan']:+.1f}%" if "overhead_vs_bare_scan" in r else "–"
        est = f"{100 * r['overhead_additive']:+.2f}%" if "overhead_additive" in r else "–"
        in_scan = f"{r['t_bare_scan_ms'] / r['nfe']:.2f}" if "t_bare_scan_ms" in r else "–"
        lines.append(f"| {r['model']} | {r['solver']} | {r['nfe']} | {r['t_model_ms']:.2f} | {in_scan} | "
                     f"{r['t_sampler_ms']:.1f} | {100 * r['overhead']:+.1f}% | {100 * r['overhead_cpu']:+.1f}% | "
                     f"{bare} | {r['per_step_us']:.0f} | {est} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
