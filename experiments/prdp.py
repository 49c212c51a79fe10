"""PRDP vs DDPO vs REINFORCE at CPU scale: reward finetuning of a class-conditional digits teacher for a
black-box reward (default: DDPO's JPEG incompressibility, the file size in kB of each sample saved as a JPEG).

    python experiments/prdp.py                                  # the three methods, 50 epochs each
    python experiments/prdp.py --only prdp --epochs 10          # a probe
    python experiments/prdp.py --groups 2 --out results/prdp/groups2      # fewer "prompts" per epoch
    python experiments/prdp.py --reward classifier:digits:label --out results/prdp/label   # saturated: see below

Teacher: ``configs/digits.py:cond`` (``_teachers.teacher_workdir("digits", variant="cond")``). Each run is
``dpmjax.methods.finetune`` with ``configs/methods/{prdp,ddpo}.py`` (G classes x n samples per epoch, the
10-step DDPM policy; the same reward-query budget for every method: ``--epochs`` epochs of G n queries, which
is 4 updates per epoch for PRDP and DDPO and 1 for REINFORCE). Scored on 500
fresh samples (50 per class, the policy's own sampler, fixed noise) per model:

  reward           the mean reward of those samples;
  label_log_prob   mean log p(label | x) under the seed-1 digits classifier (does the sample still show its class?);
  frechet          Frechet distance to the 355 held-out digits in the seed-1 classifier's features (domain
                   drift: reward hacking, e.g. noise that JPEG cannot compress, raises it);
  accuracy         share of samples the seed-1 classifier labels with their class.
The classifier reward ``classifier:digits:label`` is saturated on this teacher (log p(label | x) = -0.015 on
average, 99.4 % accuracy at 10 steps): nothing to gain, hence the JPEG default.

Writes results/prdp/curves.csv (reward_mean per update from metrics.jsonl, with reward queries),
results/prdp/scores.csv, reward_curves.png and samples_<run>.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

from _teachers import ROOT, real_split, teacher_workdir

OUT = os.path.join(ROOT, "results", "prdp")
RUNS = {  # name -> (method, config variant)
    "prdp": ("prdp", ""),
    "ddpo": ("ddpo", "objective=ppo"),
    "reinforce": ("ddpo", "objective=reinforce"),
}


def _config(method, variant, args):
    """The run's config: ``--epochs`` epochs of the method's own ``updates_per_epoch``."""
    from dpmjax.config import configs_dir, load_config

    path = os.path.join(configs_dir(), "methods", f"{method}.py")
    config = load_config(f"{path}:{variant}" if variant else path)
    with config.unlocked():
        config.method.update(reward=args.reward, groups=args.groups, group_size=args.group_size)
        if method == "prdp":
            config.method.update(beta=args.beta, clip_range=args.clip)
        config.data.batch_size = args.groups * args.group_size
        updates = args.epochs * int(config.method.updates_per_epoch)
        config.train.update(num_steps=updates, log_every=1, checkpoint_every=updates)
        config.optim.learning_rate = args.lr
    return config


def _sampler(teacher, num_steps, eta=1.0):
    import jax

    from dpmjax.samplers import plan, policy

    times = plan(teacher.schedule, "ddim", nfe=num_steps, spacing="time_uniform", eta=eta).grid["t"]
    apply_fn = teacher.apply_fn()

    @jax.jit
    def run(params, x_T, key, labels):
        traj = policy.sample_trajectory(apply_fn, params, x_T, key, times, schedule=teacher.schedule,
                                        prediction=teacher.prediction, eta=eta, cond={"y": labels})
        return jax.numpy.clip(traj.states[-1], -1.0, 1.0)

    return run


def score(params, teacher, sampler, reward, metric, real, num=500):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dpmjax.metrics.rewards import classifier_reward

    labels = jnp.repeat(jnp.arange(10), num // 10)
    x_T = jax.random.normal(jax.random.key(123), (labels.shape[0],) + teacher.image_shape, jnp.float32)
    images = np.asarray(sampler(params, x_T, jax.random.key(124), labels))
    out = {"reward": round(float(np.mean(reward(jnp.asarray(images), labels))), 5),
           "label_log_prob": round(float(np.mean(classifier_reward(metric)(jnp.asarray(images), labels))), 4)}
    logits, _ = metric._apply(images)
    out["accuracy"] = round(float(np.mean(logits.argmax(-1) == np.asarray(labels))), 4)
    out["frechet"] = round(float(metric.frechet(images, real)), 3)
    return out, images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(RUNS), help=f"runs (of {list(RUNS)})")
    parser.add_argument("--epochs", type=int, default=50, help="epochs per run (G n reward queries each)")
    parser.add_argument("--groups", type=int, default=8, help="classes (prompts) per epoch")
    parser.add_argument("--group-size", type=int, default=8, help="samples per class per epoch")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--reward", default="jpeg_incompressibility", help="a reward spec (metrics.rewards)")
    parser.add_argument("--beta", type=float, default=0.01, help="PRDP's KL weight (reward units: kB for JPEG)")
    parser.add_argument("--clip", type=float, default=1e-2, help="PRDP's proximal clip on per-step log-ratios")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    if sorted(set(names) - set(RUNS)):
        parser.error(f"unknown runs {sorted(set(names) - set(RUNS))}; choose from {list(RUNS)}")
    os.makedirs(args.out, exist_ok=True)

    from dpmjax.methods import finetune
    from dpmjax.metrics.domain import domain_metric
    from dpmjax.metrics.report import image_grid
    from dpmjax.metrics.rewards import reward_from_spec
    from dpmjax.workdir import load_params, load_teacher

    teacher = load_teacher(teacher_workdir("digits", variant="cond"))
    metric, reward = domain_metric("digits", 1), reward_from_spec(args.reward, image_shape=teacher.image_shape)
    real, _ = real_split("digits", "test")
    sampler = _sampler(teacher, 10)
    rows = []
    base, images = score(teacher.params, teacher, sampler, reward, metric, real)
    rows.append({"run": "teacher", "updates": 0, "reward_queries": 0, "seconds": 0, **base})
    image_grid(images[::5][:100], os.path.join(args.out, "samples_teacher.png"))
    print(rows[-1], flush=True)
    curves = []
    for name in names:
        method, variant = RUNS[name]
        config = _config(method, variant, args)
        workdir = os.path.join(args.out, "runs", f"{name}_g{args.groups}_n{args.group_size}_e{args.epochs}")
        start = time.perf_counter()
        finetune(method, teacher, config, workdir, num_devices=1, quiet=True)
        seconds = time.perf_counter() - start
        per_epoch = int(config.method.updates_per_epoch)
        queries = args.groups * args.group_size
        for line in open(os.path.join(workdir, "metrics.jsonl")):
            m = json.loads(line)
            epochs = (int(m["step"]) - 1) // per_epoch + 1
            curves.append({"run": name, "update": m["step"], "reward_queries": epochs * queries,
                           "reward_mean": round(m["reward_mean"], 4), "loss": round(m["loss"], 6)})
        _, params, _, _ = load_params(workdir)
        scores, images = score(params, teacher, sampler, reward, metric, real)
        rows.append({"run": name, "updates": int(config.train.num_steps), "reward_queries": args.epochs * queries,
                     "seconds": round(seconds), **scores})
        image_grid(images[::5][:100], os.path.join(args.out, f"samples_{name}.png"))
        print(rows[-1], flush=True)
    for path, data in (("scores.csv", rows), ("curves.csv", curves)):
        with open(os.path.join(args.out, path), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    plot(curves, rows, args.out)


def plot(curves, rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(c["run"] for c in curves):
        points = [(c["reward_queries"], c["reward_mean"]) for c in curves if c["run"] == name]
        ax.plot(*zip(*points), label=name)
    teacher = [r for r in rows if r["run"] == "teacher"]
    if teacher:
        ax.axhline(teacher[0]["reward"], ls=":", c="k", label="teacher (500 eval samples)")
    ax.set_xlabel("reward queries")
    ax.set_ylabel("mean reward of the epoch's samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reward_curves.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
