"""Deblurring at CPU scale: regression baseline vs icDPM vs icDPM + multiscale structure guidance (Ren et al.,
ICCV 2023, arXiv 2212.01789), in distribution and on held-out blur (issue 18; dpmjax/methods/deblur.py).

    python experiments/deblur.py                                          # configs/deblur_digits.py, ~15 min
    python experiments/deblur.py --config configs/deblur_digits.py:runlocal --out /tmp/deblur_smoke
    python experiments/deblur.py --config.train.num_steps=3000            # any config override

Each variant trains ``config.train.num_steps`` updates on the training split (pairs y = k * x + n drawn on the fly
from ``config.blur.train``), then restores the test split blurred by every family in ``config.blur`` (the same
blurry images for every variant: fixed kernels, noise and x_T keys). Scores per (variant, NFE, family):

  psnr, ssim   mean over images (``dpmjax.data.blur.psnr`` / ``ssim``: dm-pix on [0, 1]);
  frechet      Frechet distance between the restored set and the sharp test set in the seed-0 digits classifier's
               128-d penultimate features (``dpmjax.metrics.domain``), images average-pooled back to the
               classifier's 8 x 8 (for Fashion-MNIST 28 x 28 as they are). It stands in for LPIPS, whose JAX ports
               fetch VGG / AlexNet weights from the network (not available here).

Row "blurry" scores the input itself. Writes OUT/scores.csv, OUT/train.csv (loss history and seconds per step) and
OUT/grid_FAMILY.png (rows: blurry / regression / icDPM / guided at the first NFE / sharp).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "deblur")


def frechet_images(images, config):
    """Images as the domain classifier reads them: digits pooled to 8 x 8, Fashion-MNIST unchanged."""
    import jax.numpy as jnp

    from dpmjax.data.blur import downsample

    if config.data.name == "digits":
        return downsample(jnp.asarray(images), config.data.image_shape[0] // 8)
    return jnp.asarray(images)


def save_grid(rows, path, columns=12):
    """rows: list of [N, H, W, C] arrays in [-1, 1] (C = 1 or 3); one PNG, one row each, 1-pixel white gaps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    height, width, channels = rows[0].shape[1:4]
    canvas = np.ones((len(rows) * (height + 1), columns * (width + 1), channels))
    for r, images in enumerate(rows):
        for c, image in enumerate(np.asarray(images)[:columns]):
            canvas[r * (height + 1):r * (height + 1) + height, c * (width + 1):c * (width + 1) + width] = \
                np.clip((image + 1) / 2, 0, 1)
    if channels == 1:
        plt.imsave(path, canvas[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        plt.imsave(path, canvas)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "deblur_digits.py"))
    parser.add_argument("--out", default=OUT)
    args, rest = parser.parse_known_args(argv)

    import jax
    import jax.numpy as jnp

    from dpmjax.config import load_config
    from dpmjax.data.blur import degrade, psnr, ssim
    from dpmjax.methods import deblur
    from dpmjax.metrics.domain import CONFIGS as DOMAIN_CONFIGS, domain_metric

    config = load_config(args.config, rest)
    os.makedirs(args.out, exist_ok=True)
    train_images = deblur.load_images(config, "train")
    test_images = deblur.load_images(config, "test")[:config.sample.num]
    families = {name: deblur.blur_family(config.blur[name]) for name in config.blur}
    blurry = {name: degrade(jax.random.key(1000 + i), jnp.asarray(test_images), family)[0]
              for i, (name, family) in enumerate(families.items())}
    # A domain classifier exists for digits and Fashion-MNIST; elsewhere (CIFAR-10) the FD column is left empty.
    metric = domain_metric(config.data.name) if config.data.name in DOMAIN_CONFIGS else None
    sharp_features = frechet_images(test_images, config)

    rows, history_rows, grids = [], [], {name: [blurry[name]] for name in families}

    def score(variant, nfe, family, restored, train_s, restore_s):
        rows.append({"variant": variant, "nfe": nfe, "family": family,
                     "psnr": float(jnp.mean(psnr(restored, test_images))),
                     "ssim": float(jnp.mean(ssim(restored, test_images))),
                     "frechet": (metric.frechet(frechet_images(restored, config), sharp_features)
                                 if metric else float("nan")),
                     "train_s": round(train_s, 1), "restore_s": round(restore_s, 2)})
        print(rows[-1], flush=True)

    for name in families:
        score("blurry", 0, name, blurry[name], 0.0, 0.0)
    for variant in deblur.VARIANTS:
        start = time.perf_counter()
        state, history = deblur.train(config, variant, train_images)
        train_s = time.perf_counter() - start
        history_rows += [{"variant": variant, **h} for h in history]
        nfes = (1,) if variant == "regression" else tuple(config.eval.nfe)
        for nfe in nfes:
            restore = deblur.make_restorer(config, variant, nfe=None if variant == "regression" else nfe)
            for name in families:
                start = time.perf_counter()
                restored = jax.block_until_ready(restore(state.ema_params, blurry[name], jax.random.key(7)))
                score(variant, nfe, name, restored, train_s, time.perf_counter() - start)
                if nfe == nfes[0]:
                    grids[name].append(restored)

    with open(os.path.join(args.out, "scores.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = sorted({k for h in history_rows for k in h}, key=lambda k: (k != "variant", k != "step", k))
    with open(os.path.join(args.out, "train.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(history_rows)
    for name, images in grids.items():
        save_grid(images + [test_images], os.path.join(args.out, f"grid_{name}.png"))
    print(f"wrote {args.out}/scores.csv, train.csv, grid_*.png")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
