"""LMD (dpmjax/methods/lmd.py) on Fashion-MNIST latents: mask-ratio curricula vs MAE's fixed 0.75 at equal steps,
a linear probe of the encoders, and inpainting by LMD's one pass vs a latent DPM's replacement-DDIM sampling.

    python experiments/lmd.py        # CSV + PNG in results/lmd/; LMD_STEPS=N (default below), LMD_EVAL_EVERY=N

1. The VAE and the latent DiT of experiments/vae.py (cached; trained there if missing).
2. ``dpmjax finetune --method lmd`` (configs/methods/lmd.py at batch 64, LMD_STEPS updates, AdamW 1e-3 cosine) with
   schedule fixed (MAE, 0.75), linear, piecewise and cosine (0.15 -> 0.75); a checkpoint every LMD_EVAL_EVERY
   steps. Each checkpoint is scored on 1000 test-split latents with one fixed set of 0.75 masks (the final task's
   ratio for every schedule): mean squared error on the masked patches, in units of the scaled latents (std 1).
   Wall-clock = training time from metrics.jsonl (compile excluded). "steps to baseline": the first checkpoint
   whose error is at most the fixed-ratio run's final error.
3. Linear probe: logistic regression (scikit-learn, lbfgs) on the mean-pooled encoder tokens of the unmasked
   latents, 5000 training / 2000 test images; the raw flattened latents and pixels as references.
4. Inpainting: 256 test images, 75% of the 49 latent positions masked (one fixed mask per image). LMD: one
   forward pass fills the masked patches. Latent DPM: the DiT of experiments/vae.py (null class) sampled by DDIM
   (``solver="ddim"``) with x0 replacement on the known latents (``lmd.replacement_model_fn``) at 10 and 25 NFE.
   Errors: MSE on the masked latent entries, and pixel MSE of the decoded result to the original image; time per
   256 images after compilation.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "results", "lmd")

STEPS = int(os.environ.get("LMD_STEPS", 400))
EVAL_EVERY = int(os.environ.get("LMD_EVAL_EVERY", 50))
SCHEDULES = ("fixed", "linear", "piecewise", "cosine")
BATCH = 64
EVAL_RATIO = 0.75


def _config(schedule):
    from dpmjax.config import configs_dir, load_config

    path = os.path.join(configs_dir(), "methods", "lmd.py") + f":schedule={schedule},steps={STEPS}"
    return load_config(path, [f"--config.data.batch_size={BATCH}", f"--config.train.checkpoint_every={EVAL_EVERY}",
                              f"--config.train.log_every={EVAL_EVERY}",
                              f"--config.train.keep_checkpoints={STEPS // EVAL_EVERY + 1}"])


def _run(schedule, teacher) -> str:
    from dpmjax.methods import finetune
    from dpmjax.workdir import checkpoint_steps

    workdir = os.path.join(OUT, "runs", f"{schedule}_{STEPS}")
    try:
        if checkpoint_steps(workdir)[-1] >= STEPS:
            return workdir
    except FileNotFoundError:
        pass
    print(f"training lmd schedule={schedule} ({STEPS} steps)", flush=True)
    finetune("lmd", teacher, _config(schedule), workdir, quiet=True)
    return workdir


def _wallclock(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    clock, last, out = 0.0, 0, {0: 0.0}
    for row in rows:
        clock += (row["step"] - last) * BATCH / row["images_per_s"]
        last = row["step"]
        out[row["step"]] = clock
    return out


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dpmjax
    from dpmjax.data.latents import latent_source
    from dpmjax.methods import lmd
    from dpmjax.methods.loop import restore_method_state
    from dpmjax.metrics.report import image_grid
    from dpmjax.nn import make_apply_fn
    from dpmjax.nn.vae import VAE
    from dpmjax.workdir import checkpoint_steps, load_config_of, load_params, load_teacher
    from vae import latent_workdir, vae_workdir
    from _teachers import real_split

    os.makedirs(OUT, exist_ok=True)
    start = time.perf_counter()
    import ml_collections

    vae_dir = vae_workdir()
    teacher = load_teacher(vae_dir)
    latent_config = ml_collections.ConfigDict({"data": {"name": "fashion_mnist", "image_shape": (7, 7, 4),
                                                        "latent": {"vae_workdir": vae_dir, "scale_factor": 0.0}}})
    train_latents = latent_source(latent_config, split="train")
    test_latents = latent_source(latent_config, split="test")
    z_test = test_latents.images[:1000]
    num_patches = int(np.prod(z_test.shape[1:3]))
    eval_mask = lmd.random_patch_mask(jax.random.key(123), len(z_test), num_patches, EVAL_RATIO)

    runs = {s: _run(s, teacher) for s in SCHEDULES}
    curves, finals = [], {}
    for schedule, workdir in runs.items():
        config = load_config_of(workdir)
        clock = _wallclock(workdir)
        module = None
        for step in checkpoint_steps(workdir):
            program, abstract, state = restore_method_state(config, workdir, step=step)
            if module is None:
                module = lmd.build_autoencoder(lmd._settings(config), z_test.shape[1:])
                loss_fn = jax.jit(lambda p, z, m: lmd.masked_patch_loss(module, p, z, m)[0])
            error = float(loss_fn(program.student(state, False), jnp.asarray(z_test), eval_mask))
            curves.append({"schedule": schedule, "step": step, "train_s": round(clock.get(step, float("nan")), 2),
                           "masked_mse": error})
        finals[schedule] = (module, program.student(state, False))
    baseline = [row for row in curves if row["schedule"] == "fixed"][-1]["masked_mse"]

    # linear probe
    from sklearn.linear_model import LogisticRegression

    def probe(train_x, test_x):
        clf = LogisticRegression(max_iter=1000)
        clf.fit(train_x, train_latents.labels[:5000])
        return float(clf.score(test_x, test_latents.labels[:2000]))

    summary = []
    for schedule, (module, params) in finals.items():
        feats = jax.jit(lambda p, z: lmd.pooled_features(module, p, z))
        f_train = np.concatenate([np.asarray(feats(params, train_latents.images[i:i + 1000])) for i in range(0, 5000, 1000)])
        f_test = np.concatenate([np.asarray(feats(params, test_latents.images[i:i + 1000])) for i in range(0, 2000, 1000)])
        rows = [r for r in curves if r["schedule"] == schedule]
        reached = [r for r in rows if r["masked_mse"] <= baseline]
        summary.append({"schedule": schedule, "steps": STEPS, "final_masked_mse": rows[-1]["masked_mse"],
                        "train_s": rows[-1]["train_s"],
                        "steps_to_fixed_final": reached[0]["step"] if reached else "not reached",
                        "train_s_to_fixed_final": reached[0]["train_s"] if reached else "not reached",
                        "probe_acc": probe(f_train, f_test)})
    images_train, _ = real_split("fashion_mnist", "train")
    images_test, _ = real_split("fashion_mnist", "test")
    summary.append({"schedule": "raw latents (reference)", "steps": 0, "final_masked_mse": "", "train_s": "",
                    "steps_to_fixed_final": "", "train_s_to_fixed_final": "",
                    "probe_acc": probe(train_latents.images[:5000].reshape(5000, -1),
                                       test_latents.images[:2000].reshape(2000, -1))})
    summary.append({"schedule": "raw pixels (reference)", "steps": 0, "final_masked_mse": "", "train_s": "",
                    "steps_to_fixed_final": "", "train_s_to_fixed_final": "",
                    "probe_acc": probe(images_train[:5000].reshape(5000, -1), images_test[:2000].reshape(2000, -1))})

    # inpainting
    latent_dir = latent_workdir()  # the latent DPM of experiments/vae.py (trained there if missing)
    vae_model, vae_params, _, _ = load_params(vae_dir)
    dpm_model, dpm_params, schedule_obj, _ = load_params(latent_dir)
    from dpmjax.data.latents import latent_scale
    s = latent_scale(latent_config)  # the test latents are scaled by s: decode z / s
    n = 256
    z0 = jnp.asarray(test_latents.images[:n])
    originals = images_test[:n]
    mask = lmd.random_patch_mask(jax.random.key(7), n, num_patches, EVAL_RATIO)
    mask_latent = lmd.unpatchify(jnp.broadcast_to(mask[:, :, None], (n, num_patches, z0.shape[-1])), z0.shape[1:], 1)
    decode = jax.jit(lambda v, z: vae_model.apply(v, z / s, method=VAE.decode))
    full_recon = np.clip(np.asarray(decode(vae_params, z0)), -1, 1)

    def errors(z_filled):
        latent_mse = float(jnp.sum(jnp.where(mask_latent, (z_filled - z0) ** 2, 0.0)) / jnp.sum(mask_latent))
        pixels = np.clip(np.asarray(decode(vae_params, z_filled)), -1, 1)
        return latent_mse, float(np.mean(((pixels - originals) / 2) ** 2)), pixels

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))  # compile
        tick = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        return out, time.perf_counter() - tick

    inpaint_rows, grids = [], [originals[:16], np.where(np.asarray(mask_latent[:16]).repeat(4, 1).repeat(4, 2)[..., :1],
                                                         -1.0, full_recon[:16])]
    for schedule in ("fixed", "cosine"):
        module, params = finals[schedule]
        fill = jax.jit(lambda p, z, m: lmd.reconstruct(module, p, z, m))
        z_filled, seconds = timed(fill, params, z0, mask)
        latent_mse, pixel_mse, pixels = errors(z_filled)
        inpaint_rows.append({"method": f"LMD one pass ({schedule})", "nfe": 1, "latent_mse_masked": latent_mse,
                             "pixel_mse_01": pixel_mse, "seconds_per_256": round(seconds, 4)})
        grids.append(pixels[:16])
    apply = make_apply_fn(dpm_model, schedule_obj)
    prediction = str(load_config_of(latent_dir).train.target)
    for nfe in (10, 25):
        def inpaint(params, x_T, known, known_mask, nfe=nfe):
            model_fn = lambda x, t: apply(params, x, t)  # noqa: E731  (null class: unconditional)
            fn = lmd.replacement_model_fn(model_fn, schedule_obj, known, known_mask, prediction)
            return dpmjax.sample(fn, x_T, schedule=schedule_obj, solver="ddim", nfe=nfe, spacing="time_uniform",
                                 prediction="x0")
        x_T = jax.random.normal(jax.random.key(11), z0.shape)
        z_filled, seconds = timed(jax.jit(inpaint), dpm_params, x_T, z0, ~mask_latent)
        z_filled = jnp.where(mask_latent, z_filled, z0)
        latent_mse, pixel_mse, pixels = errors(z_filled)
        inpaint_rows.append({"method": "latent DPM, DDIM + x0 replacement", "nfe": nfe, "latent_mse_masked": latent_mse,
                             "pixel_mse_01": pixel_mse, "seconds_per_256": round(seconds, 4)})
        grids.append(pixels[:16])
    inpaint_rows.append({"method": "VAE reconstruction of the unmasked latent (floor)", "nfe": 0,
                         "latent_mse_masked": 0.0, "pixel_mse_01": float(np.mean(((full_recon - originals) / 2) ** 2)),
                         "seconds_per_256": ""})

    for name, rows in (("curves", curves), ("summary", summary), ("inpainting", inpaint_rows)):
        with open(os.path.join(OUT, f"{name}.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    image_grid(np.concatenate(grids), os.path.join(OUT, "inpainting.png"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for schedule in SCHEDULES:
        rows = [r for r in curves if r["schedule"] == schedule]
        axes[0].plot([r["step"] for r in rows], [r["masked_mse"] for r in rows], marker="o", label=schedule)
        axes[1].plot([r["train_s"] for r in rows], [r["masked_mse"] for r in rows], marker="o", label=schedule)
    for ax, xlabel in zip(axes, ("training step", "training wall-clock (s, 2 shared cores)")):
        ax.axhline(baseline, color="gray", linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("masked-patch MSE at ratio 0.75 (test)")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "curves.png"), dpi=120)
    for rows in (summary, inpaint_rows):
        for row in rows:
            print(json.dumps(row))
    print(f"wrote {OUT}/curves.csv, summary.csv, inpainting.csv, curves.png, inpainting.png "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
