"""Per-step cost of every solver's update, beside diffusers' scheduler loop, and sampling throughput on 1 vs 8
devices.

    python experiments/sampler_step_cost.py                       # both parts (BENCHMARKS.md "Sampler step cost")
    python experiments/sampler_step_cost.py --part steps --repeats 5 --solvers ddim,dpmpp_2m,unipc
    python experiments/sampler_step_cost.py --part devices

Part "steps": batch 256 x 32 x 32 x 3 float32 and a trivial model (eps = 0.1 x: no network cost), so what is
timed is the solver itself. Per-step cost = (T(N2) - T(N1)) / (N2 - N1) for two NFEs of the same solver (jitted
``dpmjax.make_sampler``; the fixed costs of a call cancel), median over ``--repeats`` interleaved rounds.
diffusers: the same trivial model (torch) in the usual Python loop over ``scheduler.step`` with the scheduler
that corresponds (DDIM, DPMSolverMultistep (dpmsolver++ 2M / 3M, dpmsolver 2M), UniPCMultistep (bh2, order 2),
PNDM (skip_prk_steps, i.e. PLMS), Euler, Heun), timed the same way in the same process, rounds interleaved.

Part "devices": images/s of ``make_param_sampler`` (dpmpp_2m, 10 NFE, the digits UNet of configs/digits.py, 8x8x1,
batch 512) on a mesh of 1 device and of 8 simulated CPU devices (``--xla_force_host_platform_device_count=8``),
each in a fresh process. Simulated devices share the same CPU cores: this shows that sharding works and what
it costs on one host, not a speed-up.

Writes ``<out>/step_cost.csv``, ``<out>/step_cost.png`` and ``<out>/devices.csv``; prints a table.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SHAPE = (256, 32, 32, 3)
# (dpmjax solver, options, NFE pair, diffusers scheduler class, its kwargs) -- None: no diffusers counterpart
CASES = [
    ("ddim", {}, (10, 30), "DDIMScheduler", {}),
    ("dpmpp_2m", {}, (10, 30), "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("dpmpp_3m", {}, (10, 30), "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    ("dpm_solver_2m", {}, (10, 30), "DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"}),
    ("dpm_solver_3m", {}, (10, 30), None, None),
    ("unipc", {}, (10, 30), "UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
    ("unipc", {"order": 3}, (10, 30), "UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}),
    ("dc_solver", {}, (10, 30), None, None),
    ("sde_dpmpp_2m", {}, (10, 30), None, None),
    ("dpm_solver_v3", {}, (10, 30), None, None),
    ("plms", {}, (10, 30), "PNDMScheduler", {"skip_prk_steps": True}),
    ("s_pndm", {}, (10, 30), None, None),
    ("pndm", {}, (13, 33), None, None),
    ("euler", {}, (10, 30), "EulerDiscreteScheduler", {}),
    ("heun", {}, (10, 30), "HeunDiscreteScheduler", {}),
    ("dpm_solver_3", {}, (10, 30), None, None),
]
MULTISTEP = ("dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "dpm_solver_3m", "unipc", "dc_solver", "sde_dpmpp_2m",
             "dpm_solver_v3", "plms", "s_pndm", "pndm")


def label(solver, options):
    return solver + "".join(f" {k}={v}" for k, v in options.items())


def time_dpmjax(cases, repeats):
    import jax
    import jax.numpy as jnp

    import dpmjax

    schedule = dpmjax.DiscreteVP.from_name("linear")
    x_T = jax.random.normal(jax.random.key(0), SHAPE, jnp.float32)
    key = jax.random.key(1)
    fns = {}
    for solver, options, nfes, _, _ in cases:
        for nfe in nfes:
            fn = dpmjax.make_sampler(lambda x, t: 0.1 * x, schedule=schedule, solver=solver, nfe=nfe,
                                     spacing="logSNR", **options)
            fn(x_T, key).block_until_ready()  # compile
            fns[(label(solver, options), nfe)] = fn
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn(x_T, key).block_until_ready()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def time_diffusers(cases, repeats):
    import diffusers
    import torch

    torch.manual_seed(0)
    x_T = torch.randn(SHAPE[0], SHAPE[3], SHAPE[1], SHAPE[2])

    def run(cls, kwargs, steps):
        scheduler = getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule="linear", **kwargs)
        scheduler.set_timesteps(steps)
        x = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            x = scheduler.step(0.1 * model_in, t, x).prev_sample
        return x

    runs = {}
    for solver, options, nfes, cls, kwargs in cases:
        if cls is None:
            continue
        for nfe in nfes:
            steps = nfe // 2 if cls == "HeunDiscreteScheduler" else nfe  # Heun: 2 model calls per step
            runs[(label(solver, options), nfe)] = (cls, kwargs, steps)
    for args in runs.values():
        run(*args)  # warm-up
    times = {k: [] for k in runs}
    with torch.no_grad():
        for _ in range(repeats):
            for k, args in runs.items():
                start = time.perf_counter()
                run(*args)
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def part_steps(args):
    cases = [c for c in CASES if c[0] in args.solvers]
    ours = time_dpmjax(cases, args.repeats)
    theirs = time_diffusers(cases, args.repeats) if not args.no_diffusers else {}
    rows = []
    for solver, options, (n1, n2), cls, _ in cases:
        name = label(solver, options)
        row = {"solver": name, "nfe_pair": f"{n1}/{n2}",
               "dpmjax_ms_per_step": 1e3 * (ours[(name, n2)] - ours[(name, n1)]) / (n2 - n1),
               "dpmjax_ms_total_at_n2": 1e3 * ours[(name, n2)]}
        if (name, n1) in theirs:
            row["diffusers"] = cls
            row["diffusers_ms_per_step"] = 1e3 * (theirs[(name, n2)] - theirs[(name, n1)]) / (n2 - n1)
            row["ratio"] = row["diffusers_ms_per_step"] / row["dpmjax_ms_per_step"]
        rows.append(row)
        print(f"{name:<22} dpmjax {row['dpmjax_ms_per_step']:7.3f} ms/step"
              + (f"   diffusers {row['diffusers_ms_per_step']:7.3f} ms/step  ({row['ratio']:.1f}x)"
                 if "diffusers" in row else ""), flush=True)
    return rows


DEVICE_SCRIPT = r"""
import json, os, statistics, sys, time
import jax, jax.numpy as jnp
import dpmjax
from dpmjax import nn, sharding
from dpmjax.config import load_config
c = load_config("digits.py")
model = nn.build_model(c.model)
schedule = dpmjax.schedules.schedule_from_config(c.schedule)
params = nn.init_params(model, (8, 8, 1), 0)
mesh = sharding.make_mesh()
sampler = dpmjax.make_param_sampler(nn.make_apply_fn(model, schedule), schedule=schedule, solver="dpmpp_2m",
                                    nfe=10, spacing="logSNR", mesh=mesh)
x_T = jax.random.normal(jax.random.key(0), (512, 8, 8, 1))
sampler(params, x_T).block_until_ready()
times = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    sampler(params, x_T).block_until_ready()
    times.append(time.perf_counter() - start)
print(json.dumps({"devices": mesh.size, "images_per_s": 512 / statistics.median(times)}))
"""


def part_devices(args):
    rows = []
    for count in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
        out = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(args.repeats)], env=env, check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{count} device(s): {rows[-1]['images_per_s']:.0f} images/s", flush=True)
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [r["solver"] for r in rows]
    ax.barh(range(len(rows)), [r["dpmjax_ms_per_step"] for r in rows], height=0.4, label="dpmjax (jit, scan)")
    ax.barh([i + 0.4 for i in range(len(rows))], [r.get("diffusers_ms_per_step", 0.0) for r in rows], height=0.4,
            label="diffusers (torch loop)")
    ax.set_yticks([i + 0.2 for i in range(len(rows))], names, fontsize=7)
    ax.set_xlabel("ms per step, batch 256x32x32x3 float32, trivial model")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("steps", "devices", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds (median)")
    parser.add_argument("--solvers", default=",".join(dict.fromkeys(c[0] for c in CASES)),
                        help="comma-separated dpmjax solvers of the table")
    parser.add_argument("--no-diffusers", action="store_true", help="skip the diffusers side")
    parser.add_argument("--out", default=os.path.join("results", "sampler_step_cost"))
    args = parser.parse_args(argv)
    args.solvers = [s for s in args.solvers.split(",") if s]
    unknown = sorted(set(args.solvers) - {c[0] for c in CASES})
    if unknown:
        parser.error(f"--solvers: unknown {unknown}; choose from {sorted({c[0] for c in CASES})}")
    os.makedirs(args.out, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    if args.part in ("steps", "both"):
        rows = part_steps(args)
        with open(os.path.join(args.out, "step_cost.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["solver", "nfe_pair", "dpmjax_ms_per_step", "dpmjax_ms_total_at_n2",
                                                   "diffusers", "diffusers_ms_per_step", "ratio"], restval="")
            writer.writeheader()
            writer.writerows(rows)
        plot(rows, os.path.join(args.out, "step_cost.png"))
    if args.part in ("devices", "both"):
        rows = part_devices(args)
        with open(os.path.join(args.out, "devices.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"wrote {args.out}; load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
