"""Sampling throughput of the converted CIFAR-10 DDPM UNet: dpmjax (jitted) vs diffusers' torch loop, same CPU.

    python experiments/diffusers_throughput.py                       # batch 64, dpmpp_2m 10 NFE, 2 timed reps
    python experiments/diffusers_throughput.py --batch-size 4 --reps 1 --small   # smoke run

Both sides run the same work on the same random weights: the google/ddpm-cifar10-32 UNet2DModel layout (35.7M
parameters, seeded random init) built in torch, saved with ``save_pretrained`` and converted with
``dpmjax.convert``; the same float32 x_T; DPM-Solver++(2M) for 10 model calls on diffusers' "linspace"
timesteps ending at sigma = 0. diffusers: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2)`` stepping the torch ``UNet2DModel`` under ``torch.inference_mode`` with ``--threads`` intra-op
threads. dpmjax: ``jax.jit`` of ``dpmjax.sample(..., solver="dpmpp_2m", spacing="linspace",
final_sigma="zero")`` with the params as an argument, on one CPU device (XLA's own thread pool uses the
machine's cores). Compilation (JAX) and the first call (torch) are timed separately; timed reps alternate so
that a changing machine load hits both. Writes ``results/diffusers_throughput/throughput.csv`` and prints a
markdown section.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import dpmjax
from dpmjax.config import load_config
from dpmjax.nn import make_model_fn
from dpmjax.convert import convert_diffusers
from dpmjax.workdir import load_params

SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
             "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}


def unet_config(small: bool) -> dict:
    """google/ddpm-cifar10-32's UNet2DModel config: the model section of configs/cifar10_ddpm_pretrained.py
    without dpmjax's own fields (kind, timestep_scale, bfloat16)."""
    model = load_config("cifar10_ddpm_pretrained.py").model.to_dict()
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.items()
              if k not in ("kind", "timestep_scale", "bfloat16")}
    if small:
        config.update(block_out_channels=[32, 64, 64, 64])
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--small", action="store_true", help="4x fewer channels (smoke runs)")
    parser.add_argument("--out-dir", default="results/diffusers_throughput")
    args = parser.parse_args()
    import diffusers
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = unet_config(args.small)
    net = diffusers.UNet2DModel(**config).eval()
    num_params = sum(p.numel() for p in net.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        net.save_pretrained(os.path.join(tmp, "unet"))
        with open(os.path.join(tmp, "unet", "scheduler_config.json"), "w") as f:
            json.dump(SCHEDULER, f)
        start = time.perf_counter()
        out = convert_diffusers(os.path.join(tmp, "unet"), os.path.join(tmp, "converted"), log=lambda *_: None)
        model, variables, schedule, _ = load_params(out)
        convert_s = time.perf_counter() - start
    x_T = np.random.default_rng(0).standard_normal((args.batch_size, 32, 32, 3)).astype(np.float32)

    def run(params, x):
        return dpmjax.sample(make_model_fn(model, params, schedule), x, schedule=schedule, solver="dpmpp_2m",
                             nfe=args.nfe, spacing="linspace", final_sigma="zero")

    start = time.perf_counter()
    compiled = jax.jit(run).lower(variables, jnp.asarray(x_T)).compile()
    compile_s = time.perf_counter() - start

    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        SCHEDULER, algorithm_type="dpmsolver++", solver_order=2)

    def torch_sample():
        scheduler.set_timesteps(args.nfe)
        x = torch.from_numpy(x_T).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            for t in scheduler.timesteps:
                x = scheduler.step(net(x, t).sample, t, x).prev_sample
        return x.permute(0, 2, 3, 1).numpy()

    start = time.perf_counter()
    torch_out = torch_sample()
    torch_first_s = time.perf_counter() - start
    start = time.perf_counter()
    jax_out = np.asarray(jax.block_until_ready(compiled(variables, jnp.asarray(x_T))))
    jax_first_s = time.perf_counter() - start
    rel_diff = float(np.abs(jax_out - torch_out).max() / np.abs(torch_out).max())

    jax_times, torch_times = [jax_first_s], [torch_first_s]
    for _ in range(args.reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables, jnp.asarray(x_T)))
        jax_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_sample()
        torch_times.append(time.perf_counter() - start)
    # the first torch call is already a full run (no compilation): every call counts; median over all
    jax_s, torch_s = float(np.median(jax_times)), float(np.median(torch_times))
    rows = [
        {"framework": "dpmjax (jax.jit)", "seconds_per_batch": jax_s, "images_per_s": args.batch_size / jax_s,
         "compile_s": compile_s, "runs": len(jax_times)},
        {"framework": f"diffusers (torch {torch.__version__}, {args.threads} threads)", "seconds_per_batch": torch_s,
         "images_per_s": args.batch_size / torch_s, "compile_s": 0.0, "runs": len(torch_times)},
    ]
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "throughput.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["framework", "batch", "nfe", "params", "seconds_per_batch",
                                               "images_per_s", "compile_s", "runs", "max_rel_diff"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "batch": args.batch_size, "nfe": args.nfe, "params": num_params,
                             "max_rel_diff": rel_diff})
    print(f"## Pretrained diffusers UNet: sampling throughput, dpmjax vs diffusers ({datetime.date.today()})\n")
    print(f"`python experiments/diffusers_throughput.py --batch-size {args.batch_size} --nfe {args.nfe} "
          f"--reps {args.reps}`; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}. UNet2DModel "
          f"{num_params / 1e6:.1f}M params, conversion {convert_s:.1f} s. dpmpp_2m, {args.nfe} NFE, batch "
          f"{args.batch_size}; outputs agree to {rel_diff:.1e} (max abs diff / max abs).\n")
    print("| framework | s / batch (median) | images/s | compile s | runs |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['framework']} | {row['seconds_per_batch']:.1f} | {row['images_per_s']:.2f} | "
              f"{row['compile_s']:.1f} | {row['runs']} |")
    print(f"\nall times (s): jax {[round(t, 1) for t in jax_times]}, torch {[round(t, 1) for t in torch_times]}; "
          f"wrote {path}")


if __name__ == "__main__":
    main()
