"""Reward finetuning at CPU scale: PRDP vs DDPO vs REINFORCE (black-box reward, online) and AdjointDPM
(gradients through the sampler) at an equal budget of reward queries, on 8x8 digits.

    python experiments/prdp.py                                   # task "three": the four methods, 3200 queries
    python experiments/prdp.py --only prdp --beta 10 --out results/prdp/three_beta10    # PRDP near the teacher
    python experiments/prdp.py --task ink --classes 2 --only prdp,ddpo --queries 1280 --out results/prdp/ink_c2
    python experiments/prdp.py --task ink --classes 10 --only prdp,ddpo --queries 1280 --out results/prdp/ink_c10
    python experiments/prdp.py --task next --classes 2 --only prdp,ddpo --queries 1280 --out results/prdp/next_c2
    python experiments/prdp.py --task jpeg --queries 240 --lr 1e-4 --beta 0.01       # the first probe's setting

Tasks (``TASKS``):
  three  the unconditional digits teacher (``configs/digits.py``) learns to draw 3s: reward log p(3 | x) of the
         seed-0 digits classifier (``classifier:digits:3``; the teacher: -20 on average, 12 % of its samples
         are 3s). The log-probability grades every sample; p(3 | x) is ~0 for the 88 % that are not 3s, so
         a batch carries little signal (a PRDP probe with it, 52 updates of 64 samples, moved nothing);
  next   the class-conditional teacher (``configs/digits.py:cond``) drawing class c is rewarded with
         log p(c + 1 | x): one target per prompt (class), so more classes means more distinct things to learn
         from the same queries -- the setting of PRDP's large-scale claim. ``--classes C`` draws the groups
         from classes 0..C-1 (and scores those classes);
  ink    the class-conditional teacher, reward the mean brightness (the amount of ink): a reward that varies a
         lot within the teacher's own samples (so the online methods can climb it) and is trivially hacked by
         white images -- the held-out scores measure whether the samples still show their class. The stability
         study runs it with ``--classes 2`` and ``--classes 10``;
  jpeg   the conditional teacher, DDPO's JPEG incompressibility (no headroom on 8x8 images: the first probe).

Runs: ``dpmjax.methods.finetune`` with configs/methods/{prdp,ddpo,adjoint_reward}.py. One epoch of the online
methods is G groups x n samples = G n reward queries; PRDP and DDPO make K = ``--updates`` updates per epoch,
REINFORCE 1; AdjointDPM makes one update per G n queries (its batch). PRDP and DDPO get the same proximal
radius (``--clip`` on per-step log-ratios / ratios; DDPO's official 1e-4 is for SD's 16k-dim latents). All
take AdamW at ``--lr``. The online methods' policy is the ``--steps``-step DDPM sampler, AdjointDPM's the
Heun ODE on Karras' grid at the same NFE (its config's default).

Scored on 500 fresh samples per model (fixed noise; the model's own sampler; the teacher under both; for
``--classes C``, 500 // C of each class finetuned on):
  reward        mean reward (the seed-0 classifier, the one finetuned against);
  heldout_p     p(target | x) under the seed-1 classifier, which no method saw: a reward won by fooling the
                seed-0 network (adversarial pixels) rises in ``reward`` but not here -- the reward-hacking check;
  heldout_acc   share of samples the seed-1 classifier assigns to their target class;
  frechet       Frechet distance, in seed-1 features, to the real digits of the samples' target classes
                (all 1797 digits, drawn to the same class mix): do the samples look like real targets?;
  diversity     mean pairwise pixel distance of the samples over that of the matched real digits (1 = as
                varied as the data; collapse onto a few images lowers it);
  pixel_nn      mean pixel distance from a sample to the nearest real digit of its target class, over real
                digits' own nearest-neighbour distance (~1 on the data; noise or adversarial patterns, which
                can fool both classifiers, put it far above 1).

and, from the run's metrics, drift: the mean per-step log pi_old / pi_ref of the trajectories of the last 10 % of
the run (how far the policy has moved from the teacher; nan for AdjointDPM, whose ODE has no likelihood ratio).

Writes OUT/scores.csv, curves.csv (reward_mean and log_ratio per logged update, with reward queries),
reward_curves.png and samples_<run>.png (one row per 16 samples).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

from _teachers import ROOT, nearest_distances, teacher_workdir

OUT = os.path.join(ROOT, "results", "prdp")
TASKS = {  # name -> (teacher variant, reward spec, target of a sample with label y, PRDP's beta)
    "three": ("", "classifier:digits:3", lambda y: 3 + 0 * y, 1.0),  # beta 10 stops PRDP early (BENCHMARKS)
    "next": ("cond", "classifier:digits:next", lambda y: (y + 1) % 10, 10.0),
    "ink": ("cond", "brightness", lambda y: y, 0.05),
    "jpeg": ("cond", "jpeg_incompressibility", lambda y: y, 0.01),
}
RUNS = {  # name -> (method, config variant, proximal: K = --updates updates per epoch, else 1)
    "prdp": ("prdp", "", True),
    "ddpo": ("ddpo", "objective=ppo", True),
    "reinforce": ("ddpo", "objective=reinforce", False),
    "adjoint": ("adjoint_reward", "", False),
}


def _config(method, variant, per_epoch, args, reward):
    """The run's config: ``--queries`` reward queries in epochs (online) or batches (adjoint) of G n."""
    from dpmjax.config import configs_dir, load_config

    path = os.path.join(configs_dir(), "methods", f"{method}.py")
    config = load_config(f"{path}:{variant}" if variant else path)
    batch = args.groups * args.group_size
    epochs = args.queries // batch
    with config.unlocked():
        config.method.reward = reward
        if method == "adjoint_reward":
            config.method.update(batch=batch, steps=args.steps // 2)  # heun: 2 calls per step
        else:
            config.method.update(groups=args.groups, group_size=args.group_size, steps=args.steps,
                                 updates_per_epoch=per_epoch, classes=args.classes)
            config.method.update({"beta": args.beta, "clip_range": args.clip} if method == "prdp" else
                                 {"clip_range": args.clip})
        config.data.batch_size = batch
        updates = epochs * per_epoch
        config.train.update(num_steps=updates, log_every=per_epoch, checkpoint_every=updates)
        config.optim.learning_rate = args.lr
    return config


def _sampler(teacher, kind, nfe):
    """jitted (params, x_T, key, labels) -> images in [-1, 1]: the nfe-step DDPM policy or the nfe/2-step Heun ODE."""
    import jax
    import jax.numpy as jnp

    from dpmjax.adjoint import generate
    from dpmjax.samplers import plan, policy

    apply_fn, conditional = teacher.apply_fn(), teacher.num_classes is not None
    times = plan(teacher.schedule, "ddim", nfe=nfe, spacing="time_uniform", eta=1.0).grid["t"]

    @jax.jit
    def run(params, x_T, key, labels):
        cond = {"y": labels} if conditional else {}
        if kind == "ode":
            x_0, _ = generate(apply_fn, params, x_T, cond or None, schedule=teacher.schedule, method="backsolve",
                              num_steps=nfe // 2, solver="heun", spacing="karras", prediction=teacher.prediction)
        else:
            x_0 = policy.sample_trajectory(apply_fn, params, x_T, key, times, schedule=teacher.schedule,
                                           prediction=teacher.prediction, eta=1.0, cond=cond).states[-1]
        return jnp.clip(x_0, -1.0, 1.0)

    return run


def score(params, teacher, sampler, reward, target_of, evaluator, real, classes=10, num=500):
    import jax
    import jax.numpy as jnp
    import numpy as np

    real_images, real_labels = real
    labels = np.repeat(np.arange(classes), num // classes).astype(np.int32)  # the classes finetuned on
    num = len(labels)
    targets = np.asarray(target_of(labels))
    x_T = jax.random.normal(jax.random.key(123), (num,) + teacher.image_shape, jnp.float32)
    images = np.asarray(sampler(params, x_T, jax.random.key(124), jnp.asarray(labels)))
    logits, _ = evaluator._apply(images)
    p = np.asarray(jax.nn.softmax(logits, axis=-1))
    rng = np.random.default_rng(0)  # real digits with the samples' mix of target classes
    matched = np.concatenate([rng.choice(np.flatnonzero(real_labels == c), np.sum(targets == c))
                              for c in np.unique(targets)])
    return {"reward": round(float(np.mean(reward(jnp.asarray(images), jnp.asarray(labels)))), 4),
            "heldout_p": round(float(np.mean(p[np.arange(num), targets])), 4),
            "heldout_acc": round(float(np.mean(p.argmax(-1) == targets)), 4),
            "frechet": round(float(evaluator.frechet(images, real_images[matched])), 2),
            "diversity": round(_pairwise(images) / _pairwise(real_images[matched]), 3),
            "pixel_nn": round(_pixel_nn(images, targets, real_images, real_labels), 3)}, images


def _pairwise(images):
    import numpy as np

    flat = images.reshape(len(images), -1).astype(np.float64)
    sq = np.sum(flat ** 2, 1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * flat @ flat.T, 0)
    return float(np.sqrt(d2)[np.triu_indices(len(flat), 1)].mean())


def _pixel_nn(images, targets, real_images, real_labels):
    """Mean pixel distance from each sample to the nearest real digit of its target class, over the mean distance
    from each real digit of those classes to its nearest other one: ~1 on the data manifold, far above 1 for
    noise or adversarial patterns that no classifier-based score catches (both classifiers are convnets of one
    architecture, and adversarial pixels transfer between them)."""
    import numpy as np

    sample, real = [], []
    for c in np.unique(targets):
        own = real_images[real_labels == c]
        sample.append(nearest_distances(images[targets == c], own))
        real.append(nearest_distances(own, own, exclude_self=True))
    return float(np.mean(np.concatenate(sample)) / np.mean(np.concatenate(real)))


def _curves(name, workdir):
    """(rows of reward_mean / log_ratio per logged update with its reward queries, drift) from a run's workdir."""
    config = json.load(open(os.path.join(workdir, "config.json")))
    per_epoch, batch = int(config["method"].get("updates_per_epoch", 1)), int(config["data"]["batch_size"])
    logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [{"run": name, "update": m["step"], "reward_queries": ((int(m["step"]) - 1) // per_epoch + 1) * batch,
             "reward_mean": round(m["reward_mean"], 4), "loss": round(m["loss"], 6),
             "log_ratio": round(m.get("log_ratio", float("nan")), 4)} for m in logged]
    tail = logged[-max(1, len(logged) // 10):]  # drift from pi_ref over the last 10 % of the run
    return rows, round(sum(m.get("log_ratio", float("nan")) for m in tail) / len(tail), 2)


def replot(out):
    """Rebuild curves.csv, the drift column of scores.csv and the plot from OUT's finished runs."""
    rows = list(csv.DictReader(open(os.path.join(out, "scores.csv"))))
    curves = []
    for row in rows:
        workdir = os.path.join(out, "runs", row["run"])
        row["drift"] = 0.0
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            run_curves, row["drift"] = _curves(row["run"], workdir)
            curves += run_curves
        for key in ("reward", "drift"):
            row[key] = float(row[key])
    _write(out, rows, curves)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="three", choices=list(TASKS))
    parser.add_argument("--only", default=",".join(RUNS), help=f"runs (of {list(RUNS)})")
    parser.add_argument("--queries", type=int, default=3200, help="reward queries per method")
    parser.add_argument("--groups", type=int, default=4, help="groups (prompts) per epoch")
    parser.add_argument("--group-size", type=int, default=4, help="samples per group")
    parser.add_argument("--classes", type=int, default=None, help="conditional tasks: classes 0..C-1 (default all)")
    parser.add_argument("--steps", type=int, default=10, help="NFE of the policy (DDPM steps; AdjointDPM: Heun, "
                        "steps / 2)")
    parser.add_argument("--updates", type=int, default=4, help="K: PRDP's and DDPO's updates per epoch")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--beta", type=float, default=None, help="PRDP's KL weight on the mean per-step log-ratio "
                        "(default: the task's: 1 for three, 10 for next, 0.05 for brightness)")
    parser.add_argument("--clip", type=float, default=1e-2, help="PRDP's and DDPO's proximal radius")
    parser.add_argument("--reward", default=None, help="a reward spec instead of the task's")
    parser.add_argument("--out", default=None, help="default results/prdp/<task>")
    parser.add_argument("--replot", action="store_true", help="only rebuild the CSVs and the plot of OUT's runs")
    parser.add_argument("--rescore", action="store_true", help="score OUT's finished runs again (no training)")
    args = parser.parse_args()
    if (args.replot or args.rescore) and not os.path.exists(os.path.join(args.out or os.path.join(OUT, args.task),
                                                                         "scores.csv")):
        parser.error(f"--replot / --rescore read the scores.csv of finished runs: none in "
                     f"{args.out or os.path.join(OUT, args.task)}")
    if args.replot:
        return replot(args.out or os.path.join(OUT, args.task))
    names = [n for n in args.only.split(",") if n]
    if sorted(set(names) - set(RUNS)):
        parser.error(f"unknown runs {sorted(set(names) - set(RUNS))}; choose from {list(RUNS)}")
    variant, spec, target_of, beta = TASKS[args.task]
    spec = args.reward or spec
    args.beta = beta if args.beta is None else args.beta
    if args.classes is not None and not variant:
        parser.error("--classes needs a class-conditional task (next, ink, jpeg)")
    if args.queries < args.groups * args.group_size:
        parser.error("--queries must cover at least one epoch of groups x group-size")
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be even (AdjointDPM's Heun takes 2 calls per step)")
    out = args.out or os.path.join(OUT, args.task)
    os.makedirs(out, exist_ok=True)

    import numpy as np

    from dpmjax.data import get_dataset
    from dpmjax.methods import finetune
    from dpmjax.metrics.domain import all_images, domain_metric
    from dpmjax.metrics.report import image_grid
    from dpmjax.metrics.rewards import reward_from_spec
    from dpmjax.workdir import load_params, load_teacher

    teacher = load_teacher(teacher_workdir("digits", variant=variant))
    reward, evaluator = reward_from_spec(spec, image_shape=teacher.image_shape), domain_metric("digits", 1)
    if "adjoint" in names and not reward.differentiable:
        names.remove("adjoint")
        print(f"skipping adjoint: {spec} is not differentiable")
    parts = [all_images(get_dataset("digits", split)) for split in ("train", "test")]
    real = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    samplers = {"policy": _sampler(teacher, "policy", args.steps), "ode": _sampler(teacher, "ode", args.steps)}
    rows, curves = [], []

    def record(name, sampler, params, **info):
        scores, images = score(params, teacher, samplers[sampler], reward, target_of, evaluator, real,
                               classes=args.classes or 10)
        rows.append({"run": name, "sampler": sampler, **info, **scores})
        image_grid(images[::5][:96], os.path.join(out, f"samples_{name}.png"))
        print(rows[-1], flush=True)

    if args.rescore:
        for row in list(csv.DictReader(open(os.path.join(out, "scores.csv")))):
            params = teacher.params if row["run"].startswith("teacher") else \
                load_params(os.path.join(out, "runs", row["run"]))[1]
            record(row["run"], row["sampler"], params, updates=row["updates"], reward_queries=row["reward_queries"],
                   seconds=row["seconds"], drift=0.0)
        _write(out, rows, [])
        return replot(out)
    record("teacher", "policy", teacher.params, updates=0, reward_queries=0, seconds=0, drift=0.0)
    if "adjoint" in names:
        record("teacher_ode", "ode", teacher.params, updates=0, reward_queries=0, seconds=0, drift=0.0)
    batch = args.groups * args.group_size
    for name in names:
        method, config_variant, proximal = RUNS[name]
        per_epoch = args.updates if proximal else 1
        config = _config(method, config_variant, per_epoch, args, spec)
        workdir = os.path.join(out, "runs", name)
        start = time.perf_counter()
        finetune(method, teacher, config, workdir, num_devices=1, quiet=True)
        seconds = time.perf_counter() - start
        run_curves, drift = _curves(name, workdir)
        curves += run_curves
        _, params, _, _ = load_params(workdir)
        record(name, "ode" if name == "adjoint" else "policy", params, updates=int(config.train.num_steps),
               reward_queries=(args.queries // batch) * batch, seconds=round(seconds), drift=drift)
        _write(out, rows, curves)
    _write(out, rows, curves)


def _write(out, rows, curves):
    for path, data in (("scores.csv", rows), ("curves.csv", curves)):
        if data:
            with open(os.path.join(out, path), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(data[0]))
                writer.writeheader()
                writer.writerows(data)
    if curves:
        plot(curves, rows, out)


def plot(curves, rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, ax_drift) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(c["run"] for c in curves):
        queries = np.array([c["reward_queries"] for c in curves if c["run"] == name], float)
        for axis, key in ((ax, "reward_mean"), (ax_drift, "log_ratio")):
            values = np.array([c[key] for c in curves if c["run"] == name], float)
            if np.all(np.isnan(values)):
                continue
            window = max(1, len(values) // 20)  # a running mean over ~5 % of the run: epoch rewards are noisy
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(queries[window - 1:], smooth, label=name)
    for row in rows:
        if row["run"] == "teacher":
            ax.axhline(float(row["reward"]), ls=":", c="k", label="teacher (500 eval samples)")
    ax.set_xlabel("reward queries")
    ax.set_ylabel("mean reward of the update's samples")
    ax_drift.set_xlabel("reward queries")
    ax_drift.set_ylabel("drift: mean per-step log pi_old / pi_ref")
    ax.legend(fontsize=7)
    ax_drift.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reward_curves.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
