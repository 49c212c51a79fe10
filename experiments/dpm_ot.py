"""DPM-OT on digits and Fashion-MNIST: OT map + k solver steps vs the plain sampler at the same NFE (k = 2, 5, 10).

    python experiments/dpm_ot.py                      # a few minutes on 2 cores (teacher trained first if missing)
    python experiments/dpm_ot.py --ks 2 --ot-steps 100 --num-samples 200      # smoke run
    python experiments/dpm_ot.py --seed-check results/dpm_ot/workdirs/k10     # FD spread over 4 noise seeds
    python experiments/dpm_ot.py --dataset fashion_mnist --num-samples 500 --ks 2,5,10,2@0.3  # .../fashion_mnist

Teacher: ``configs/digits.py`` (``_teachers.teacher_workdir("digits")``). For each item of ``--ks`` (k: t_k derived
by the config's rule, the point of a 20-step logSNR grid with k steps left; or k@t_k: t_k given),
``dpmjax.methods.finetune`` fits the semi-discrete OT (``configs/methods/dpm_ot.py:k=K`` with every one of the
1442 training images as a target, ``--ot-steps`` Adam steps on the heights, 16384 MC draws per step) into
``results/dpm_ot/workdirs/k{K}[_t{T}]`` (a finished fit is reused), then 1000 samples from fixed noise are scored
against the 355 held-out digits:

  frechet             Frechet distance in the digits classifier's features (``dpmjax.metrics.domain``);
  mode_mixture        share of samples whose classifier max softmax <= 0.9 (1 - ``confident_share``): samples the
                      classifier cannot place in one class (the paper's mode-mixture rate, with our classifier);
  nn_train_median     median over samples of the L2 distance (pixels in [-1, 1], 64 of them) to the nearest
                      training image (memorisation check: the OT map returns noised training images);
  closer_than_heldout share of samples nearer to a training image than the median held-out digit is;
  near_copy           share of samples nearer to a training image than 95% of held-out digits are (their 5th
                      percentile).

Rows per k: DPM-OT (best chain solver / spacing by Frechet distance among ``SETTINGS``), the plain sampler from
pure noise at the same NFE (best of the same settings), and a control "random target": x_{t_k} = a uniformly
drawn target (no OT map) + the same chain, which has the same law as DPM-OT once the cell masses are equal.
Reference rows: 1000 training images scored as samples (the perfect memoriser) and the held-out set itself.
Writes results/dpm_ot/dpm_ot.csv (every setting), summary.md (best setting per row), samples_k{K}_t{T}.png (rows:
DPM-OT samples, their nearest training images, plain samples at the same NFE).

``--dataset fashion_mnist``: the Fashion-MNIST teacher (``_teachers.OVERRIDES``), a random subset of
``--num-targets`` (default 2048) of the 60000 training images as targets, scores against the 10000 test images; the
memorisation columns measure distances to all 60000 training images (784 pixels) and the held-out reference
distances on ``--num-samples`` test images.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from _teachers import ROOT, nearest_distances, real_split, teacher_workdir

from dpmjax.config import load_config
from dpmjax.methods import dpm_ot, finetune
from dpmjax.metrics.domain import domain_metric
from dpmjax.samplers.driver import make_param_sampler
from dpmjax.workdir import load_teacher

OUT = os.path.join(ROOT, "results", "dpm_ot")
SETTINGS = [(solver, spacing) for solver in ("dpmpp_2m", "unipc")
            for spacing in ("logSNR", "karras", "time_uniform", "time_quadratic")]
FIELDS = ["method", "k", "nfe", "solver", "spacing", "t_k", "sigma_t_k", "frechet", "mode_mixture",
          "nn_train_median", "closer_than_heldout", "near_copy", "seconds"]


def score(metric, samples, held_out, train, heldout_nn):
    report = metric.evaluate(np.clip(samples, -1, 1), held_out)
    d = nearest_distances(np.clip(samples, -1, 1), train)
    return {"frechet": report["frechet"], "mode_mixture": 1.0 - report["confident_share"],
            "nn_train_median": float(np.median(d)), "closer_than_heldout": float(np.mean(d < np.median(heldout_nn))),
            "near_copy": float(np.mean(d < np.percentile(heldout_nn, 5)))}


def save_png(path, rows, scale=4):
    """Rows of [N, H, W, 1] images in [-1, 1] as one grayscale PNG (white background, dark ink)."""
    from PIL import Image

    tiles = [np.concatenate([np.pad(np.clip(im[..., 0], -1, 1), 1, constant_values=-1) for im in row], axis=1)
             for row in rows]
    grid = ((1.0 - (np.concatenate(tiles, axis=0) + 1.0) / 2.0) * 255).astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def fit(teacher, k, t_k, args):
    config = load_config(os.path.join(ROOT, "configs", "methods", f"dpm_ot.py:k={k}"))
    with config.unlocked():
        config.method.update(num_targets=args.num_targets, mc_batch=4096, mc_batches=4, t_k=t_k)
        config.train.update(num_steps=args.ot_steps, log_every=50, checkpoint_every=args.ot_steps)
    workdir = os.path.join(args.out, "workdirs", f"k{k}" + (f"_t{t_k:g}" if t_k else ""))
    start = time.time()
    finetune("dpm_ot", teacher, config, workdir, num_devices=1, quiet=True)
    return workdir, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="2,5,10,2@0.3,5@0.3",
                        help="k (t_k derived from k: the config default) or k@t_k (t_k given), comma-separated")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-targets", type=int, default=None, help="default: 1442 (every digit), 2048 (fashion)")
    parser.add_argument("--ot-steps", type=int, default=300)
    parser.add_argument("--dataset", default="digits", choices=("digits", "fashion_mnist"))
    parser.add_argument("--out", default=None, help="output folder (default results/dpm_ot, results/dpm_ot/<dataset>)")
    parser.add_argument("--seed-check", default=None, metavar="WORKDIR",
                        help="only the seed spread of DPM-OT vs random target on a fitted workdir (e.g. "
                             "results/dpm_ot/workdirs/k10)")
    args = parser.parse_args()
    args.out = args.out or (OUT if args.dataset == "digits" else os.path.join(OUT, args.dataset))
    args.num_targets = args.num_targets or (1442 if args.dataset == "digits" else 2048)
    os.makedirs(args.out, exist_ok=True)
    teacher = load_teacher(teacher_workdir(args.dataset))
    if args.seed_check:
        return seed_check(teacher, args.seed_check, args.out, args.dataset)
    apply_fn, schedule = teacher.apply_fn(), teacher.schedule
    train, _ = real_split(args.dataset, "train")
    held_out, _ = real_split(args.dataset, "test")
    metric = domain_metric(args.dataset)
    reference = held_out[np.random.default_rng(1).permutation(len(held_out))[:args.num_samples]]
    heldout_nn = nearest_distances(reference, train)  # how far real unseen images lie from the training set
    noise = jax.random.normal(jax.random.key(0), (args.num_samples,) + teacher.image_shape, jnp.float32)
    rows = []

    def record(row):
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    picked = np.random.default_rng(0).permutation(len(train))[:args.num_samples]
    record(dict(method="training images", k=0, nfe=0, **score(metric, train[picked], held_out, train, heldout_nn)))
    record(dict(method="held-out images", k=0, nfe=0, **score(metric, reference, held_out, train, heldout_nn)))

    best, plain_cache = {}, {}
    for item in args.ks.split(","):
        k, _, given = item.partition("@")
        k, given = int(k), float(given or 0.0)
        workdir, seconds = fit(teacher, k, given, args)
        _, state, _, config = dpm_ot.load_workdir(workdir)
        t_k = float(config.method.t_k)
        sigma_k = float(schedule.sigma(t_k))
        random_index = jax.random.randint(jax.random.key(1), (args.num_samples,), 0, state.targets.shape[0])
        tag = f"{k}@{t_k:.3g}"
        for solver, spacing in SETTINGS:
            base = dict(k=tag, nfe=k, solver=solver, spacing=spacing, t_k=t_k, sigma_t_k=sigma_k)
            try:
                ot_fn = dpm_ot.make_sampler(apply_fn, schedule=schedule, t_k=t_k, nfe=k, solver=solver, spacing=spacing,
                                            prediction=teacher.prediction)
                plain = make_param_sampler(apply_fn, schedule=schedule, solver=solver, nfe=k, spacing=spacing,
                                           prediction=teacher.prediction)
                chain = make_param_sampler(apply_fn, schedule=schedule, solver=solver, nfe=k, spacing=spacing,
                                           t_start=t_k, prediction=teacher.prediction)
            except ValueError as err:  # e.g. an NFE below the solver's minimum
                print(f"skip k={k} {solver} {spacing}: {err}")
                continue
            start = time.time()
            x_ot = np.asarray(ot_fn(state.variables, state.targets, state.heights, noise))
            ot_row = dict(method="dpm_ot", seconds=seconds + time.time() - start, **base,
                          **score(metric, x_ot, held_out, train, heldout_nn))
            if (k, solver, spacing) not in plain_cache:  # the plain sampler does not depend on t_k
                x_plain = np.asarray(plain(teacher.params, noise))
                plain_cache[(k, solver, spacing)] = (x_plain, score(metric, x_plain, held_out, train, heldout_nn))
            x_plain, plain_score = plain_cache[(k, solver, spacing)]
            plain_row = dict(method="plain", **dict(base, t_k=1.0, sigma_t_k=1.0), **plain_score)
            x_random = np.asarray(chain(teacher.params, state.targets[random_index]))
            for row in (ot_row, plain_row, dict(method="random target", **base,
                                                **score(metric, x_random, held_out, train, heldout_nn))):
                record(row)
            for name, row, x in (("dpm_ot", ot_row, x_ot), ("plain", plain_row, x_plain)):
                if (tag, name) not in best or row["frechet"] < best[(tag, name)][0]:
                    best[(tag, name)] = (row["frechet"], x)
        x_ot, x_plain = best[(tag, "dpm_ot")][1], best[(tag, "plain")][1]
        nearest = train[[int(np.argmin(((train - x) ** 2).reshape(len(train), -1).sum(-1))) for x in x_ot[:16]]]
        save_png(os.path.join(args.out, f"samples_k{k}_t{t_k:.3g}.png"), [x_ot[:16], nearest, x_plain[:16]])

    with open(os.path.join(args.out, "dpm_ot.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| method | k@t_k | NFE | solver, spacing | t_k (sigma) | FD | mode mixture | NN-train median | "
             "closer than held-out | near copy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["k"] and not any(row is r for r in _best_rows(rows)):
            continue
        where = f"{row['t_k']:.4f} ({row['sigma_t_k']:.3f})" if row["k"] else "-"
        setting = f"{row['solver']}, {row['spacing']}" if row["k"] else "-"
        lines.append(f"| {row['method']} | {row['k'] or '-'} | {row['nfe']} | {setting} | {where} | "
                     f"{row['frechet']:.2f} | {row['mode_mixture']:.3f} | {row['nn_train_median']:.2f} | "
                     f"{row['closer_than_heldout']:.3f} | {row['near_copy']:.3f} |")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def seed_check(teacher, workdir, out, dataset="digits", *, num_seeds=4, num_samples=1000, solver="dpmpp_2m",
               spacing="time_uniform"):
    """FD of DPM-OT vs the random-target control over ``num_seeds`` fresh noise / index draws (one chain setting),
    and the fitted cell masses from 524,288 fresh N(0, I) draws: how much of a difference between rows is noise.
    Writes results/dpm_ot/seed_check_<workdir name>.csv."""
    _, state, schedule, config = dpm_ot.load_workdir(workdir)
    t_k, k, n = float(config.method.t_k), int(config.method.k), state.targets.shape[0]
    masses = n * np.asarray(dpm_ot.monte_carlo_cell_masses(jax.random.key(9), state.targets, state.heights,
                                                           mc_batch=8192, mc_batches=64))
    print(f"{workdir}: n * mass(cell) over 524288 draws: min {masses.min():.3f} median {np.median(masses):.3f} "
          f"max {masses.max():.3f}")
    held_out, _ = real_split(dataset, "test")
    metric = domain_metric(dataset)
    apply_fn = teacher.apply_fn()
    ot_fn = dpm_ot.make_sampler(apply_fn, schedule=schedule, t_k=t_k, nfe=k, solver=solver, spacing=spacing,
                                prediction=teacher.prediction)
    chain = make_param_sampler(apply_fn, schedule=schedule, solver=solver, nfe=k, spacing=spacing, t_start=t_k,
                               prediction=teacher.prediction)
    rows = []
    for seed in range(num_seeds):
        noise = jax.random.normal(jax.random.key(100 + seed), (num_samples,) + teacher.image_shape, jnp.float32)
        index = jax.random.randint(jax.random.key(200 + seed), (num_samples,), 0, n)
        x_ot = np.asarray(ot_fn(state.variables, state.targets, state.heights, noise))
        x_random = np.asarray(chain(state.variables, state.targets[index]))
        fd = [metric.evaluate(np.clip(x, -1, 1), held_out)["frechet"] for x in (x_ot, x_random)]
        distinct = len(set(np.asarray(dpm_ot.ot_assign(noise, state.targets, state.heights)).tolist()))
        rows.append(dict(seed=seed, fd_dpm_ot=fd[0], fd_random_target=fd[1], distinct_targets_ot=distinct,
                         distinct_targets_random=len(set(np.asarray(index).tolist())),
                         mass_min=float(masses.min()), mass_max=float(masses.max())))
        print(rows[-1], flush=True)
    name = os.path.basename(os.path.normpath(workdir))
    with open(os.path.join(out, f"seed_check_{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _best_rows(rows):
    """The row of lowest Frechet distance per (method, k)."""
    chosen = {}
    for row in rows:
        key = (row["method"], row["k"])
        if row["k"] and (key not in chosen or row["frechet"] < chosen[key]["frechet"]):
            chosen[key] = row
    return list(chosen.values())


if __name__ == "__main__":
    main()
