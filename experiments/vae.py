"""Latent space on Fashion-MNIST: KL-autoencoder reconstruction quality, then latent diffusion through it.

    python experiments/vae.py        # CSV + PNG in results/latent/; VAE_STEPS=N, LATENT_STEPS=N (defaults below)

1. The KL autoencoder ``configs/vae_fashion_mnist.py:steps=VAE_STEPS`` (28x28x1 <-> 7x7x4, L1 + 1e-3 KL) at batch 32,
   trained once and cached by ``_teachers.teacher_workdir`` (results/teachers/vae_fashion_mnist*); reconstruction
   MSE and PSNR (images in [0, 1], peak 1) of the posterior mean on the whole test split (10k).
2. Latent diffusion ``configs/latent_fashion_mnist.py:vae=...`` (class-conditional DiT, patch 1, width 64, depth 3)
   on the scaled latents (s = 1 / std), trained LATENT_STEPS steps and cached the same way; then the very command
   a user runs, ``dpmjax sample --workdir LATENT --num 100`` (DPM-Solver++(2M), 10 NFE, guidance 2), which writes a
   decoded PNG grid; its time is measured.
Rows: results/latent/vae.csv (reconstruction), results/latent/latent_dpm.csv (training and sampling), PNGs of
test reconstructions and of the samples. ``vae_workdir()`` / ``latent_workdir()`` are reused by experiments/lmd.py.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "results", "latent")

VAE_STEPS = int(os.environ.get("VAE_STEPS", 800))
LATENT_STEPS = int(os.environ.get("LATENT_STEPS", 1000))
VAE_OVERRIDES = ["--config.data.batch_size=32", "--config.train.checkpoint_every=400"]
LATENT_OVERRIDES = ["--config.model.hidden_size=64", "--config.model.depth=3", "--config.model.freq_dim=64",
                    "--config.optim.learning_rate=1e-3", "--config.train.checkpoint_every=500"]


def vae_workdir() -> str:
    from _teachers import teacher_workdir

    return teacher_workdir("vae_fashion_mnist", variant=f"steps={VAE_STEPS}", overrides=VAE_OVERRIDES,
                           name="vae_fashion_mnist")


def latent_workdir() -> str:
    from _teachers import teacher_workdir

    return teacher_workdir("latent_fashion_mnist", variant=f"vae={vae_workdir()},steps={LATENT_STEPS}",
                           overrides=LATENT_OVERRIDES, name="latent_fashion_mnist")


def _train_seconds(workdir: str, batch_size: int) -> float:
    """Training wall-clock from metrics.jsonl (images per second between log steps), compile excluded."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    seconds, last = 0.0, 0
    for row in rows:
        seconds += (row["step"] - last) * batch_size / row["images_per_s"]
        last = row["step"]
    return seconds


def main():
    import numpy as np

    from dpmjax.data.latents import encode_images, latent_scale, load_vae
    from dpmjax.metrics.report import image_grid
    from dpmjax.workdir import load_config_of
    from _teachers import real_split

    os.makedirs(OUT, exist_ok=True)
    start = time.perf_counter()
    vae_dir = vae_workdir()
    vae_train_s = _train_seconds(vae_dir, 32)
    model, variables, _, _ = load_vae(vae_dir)
    images, _ = real_split("fashion_mnist", "test")
    tick = time.perf_counter()
    latents = encode_images(model, variables, images)
    encode_s = time.perf_counter() - tick
    import jax
    from dpmjax.nn.vae import VAE

    decode = jax.jit(lambda v, z: model.apply(v, z, method=VAE.decode))
    recon = np.concatenate([np.asarray(decode(variables, latents[i:i + 500])) for i in range(0, len(latents), 500)])
    recon = np.clip(recon, -1.0, 1.0)
    mse01 = np.mean(((recon - images) / 2.0) ** 2, axis=(1, 2, 3))  # images in [0, 1]
    psnr = 10.0 * np.log10(1.0 / np.maximum(mse01, 1e-12))
    vae_row = {"vae_steps": VAE_STEPS, "batch": 32, "train_s": round(vae_train_s, 1),
               "latent_shape": "x".join(map(str, latents.shape[1:])), "compression": round(images[0].size / latents[0].size, 2),
               "test_mse_01": float(np.mean(mse01)), "test_psnr_db": float(np.mean(psnr)),
               "test_psnr_of_mean_mse_db": float(10 * np.log10(1.0 / np.mean(mse01))),
               "latent_std_unscaled": float(np.std(latents)),
               "encode_10k_s": round(encode_s, 2)}
    with open(os.path.join(OUT, "vae.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(vae_row))
        writer.writeheader()
        writer.writerow(vae_row)
    pairs = np.concatenate([images[:64].reshape(4, 16, 28, 28, 1), recon[:64].reshape(4, 16, 28, 28, 1)], axis=1)
    image_grid(pairs.reshape(128, 28, 28, 1), os.path.join(OUT, "vae_reconstructions.png"))
    print(json.dumps(vae_row), flush=True)

    latent_dir = latent_workdir()
    config = load_config_of(latent_dir)
    latent_train_s = _train_seconds(latent_dir, int(config.data.batch_size))
    out = os.path.join(OUT, "latent_samples.npz")
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpmjax.main", "sample", "--workdir", latent_dir, "--num", "100",
                    "--labels", "0,1,2,3,4,5,6,7,8,9", "--out", out], check=True)
    sample_s = time.perf_counter() - tick
    samples = np.load(out)["images"]
    rows = [json.loads(line) for line in open(os.path.join(latent_dir, "metrics.jsonl"))]
    latent_row = {"latent_steps": LATENT_STEPS, "batch": int(config.data.batch_size),
                  "train_s": round(latent_train_s, 1), "final_loss": rows[-1]["loss"],
                  "scale_factor": latent_scale(config), "model": "DiT p1 w64 d3 (cond.)",
                  "sample_cmd_s_100_incl_load_compile_decode": round(sample_s, 1),
                  "samples_shape": "x".join(map(str, samples.shape)), "samples_finite": bool(np.isfinite(samples).all())}
    with open(os.path.join(OUT, "latent_dpm.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(latent_row))
        writer.writeheader()
        writer.writerow(latent_row)
    print(json.dumps(latent_row), flush=True)
    print(f"wrote {OUT}/vae.csv, latent_dpm.csv, vae_reconstructions.png, latent_samples.png "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
