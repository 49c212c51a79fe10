"""The cost of few-shot adaptation: full finetuning vs LoRA vs QST side by side on the shared digits setting (issue 16).

    python experiments/adaptation_cost.py                       # 1000 updates each, 500 samples, ~15 min on 2 cores
    python experiments/adaptation_cost.py --steps 300 --num 200 --only lora,qst
    python experiments/adaptation_cost.py --qst-reductions 2,1             # also QST with wider side networks

Source: the digits teacher of every method experiment (``_teachers.teacher_workdir("digits")``: v-prediction UNet,
173k parameters, 8x8). Target: the first 10 images (one per digit) of ``style:digits:invert``; held out: the
other 1787. Each method runs ``dpmjax.methods.finetune`` with its own ``configs/methods/<method>.py`` (batch 8,
Adam; learning rates 5e-4 full, 2e-3 LoRA rank 4 and QST reduction 4, as the configs document) for ``--steps``
updates. Per method:

  trainable         scalars the optimizer updates (``Program.init``'s trainable pytree);
  frozen_bytes      bytes of ``Program.frozen`` on the device (the teacher's float32 weights; QST: the NF4 backbone,
                    packed codes + double-quantised scales, with the float biases / norms);
  state_bytes       bytes of the method state (trainable params, their EMA copy, Adam's two moments);
  temp / argument / output / peak_mib
                    ``jax.jit(update, donate_argnums=0).lower(state, batch, frozen, key).compile().memory_analysis()``:
                    XLA:CPU's temporary buffers (activations, gradients, dequantised weights), the arguments (state,
                    batch, frozen), the outputs, and peak = argument + output - alias + temp (the donated state is
                    aliased); a static estimate from the compiled program, not a measured RSS;
  step_ms           the median wall time of ``--timed`` updates of that compiled function after 3 warm-up updates
                    (the loop's checkpointing and logging excluded); ``train_s`` the whole ``finetune`` run;
  fd / intra_diversity / nn_shot / copy_rate
                    ``dpmjax.metrics.few_shot.adaptation_scores`` of ``--num`` samples (fixed noise; the workdir's
                    sampler, DPM-Solver++(2M), 10 NFE, Karras grid, loaded by ``dpmjax.workdir.load_params``) in
                    the seed-0 digits classifier's features of the images mapped back by ``invert``.

Rows "source" (the teacher) and "heldout" (500 real held-out target images scored as samples) frame the quality;
"teacher_float@source" / "teacher_nf4@source" score the teacher on its float and on its dequantised NF4 weights
in the *source* domain (what 4 bits alone cost, before any side network).
Writes results/adaptation_cost/cost.csv, cost.png and grid_<method>.png.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import time

from _adaptation import grid, sampler, target_features
from _teachers import ROOT, teacher_workdir

OUT = os.path.join(ROOT, "results", "adaptation_cost")
METHODS = ("full_finetune", "lora", "qst")


def _nbytes(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _cost(program, batch, timed: int) -> dict:
    """Trainable size, frozen / state bytes, the compiled update's memory analysis and its median step time."""
    import jax
    import numpy as np

    state = jax.jit(program.init)(program.frozen, jax.random.key(0))
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    state_bytes = _nbytes(state)
    update = jax.jit(program.update, donate_argnums=0)
    compiled = update.lower(state, batch, program.frozen, jax.random.key(1)).compile()
    memory = compiled.memory_analysis()
    mib = 1 / 2 ** 20
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    times = []
    for i in range(3 + timed):
        start = time.perf_counter()
        state, scalars = compiled(state, batch, program.frozen, jax.random.key(i))
        jax.block_until_ready(scalars)
        times.append(time.perf_counter() - start)
    return {"trainable": trainable, "frozen_bytes": _nbytes(program.frozen), "state_bytes": state_bytes,
            "temp_mib": round(memory.temp_size_in_bytes * mib, 3),
            "argument_mib": round(memory.argument_size_in_bytes * mib, 3),
            "output_mib": round(memory.output_size_in_bytes * mib, 3), "peak_mib": round(peak * mib, 3),
            "step_ms": round(1000 * statistics.median(times[3:]), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--timed", type=int, default=30, help="updates timed for step_ms (after 3 warm-up ones)")
    parser.add_argument("--only", default="", help=f"comma-separated methods of {METHODS}")
    parser.add_argument("--qst-reductions", default="", help="extra QST runs qst_r<R> with side widths d / R "
                        "(the config's is 4), e.g. 2,1")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--replot", action="store_true", help="only redraw cost.png from OUT/cost.csv")
    args = parser.parse_args()
    if args.replot:
        with open(os.path.join(args.out, "cost.csv")) as f:
            rows = [{k: (float(v) if v not in ("",) and k != "method" else v) for k, v in r.items()}
                    for r in csv.DictReader(f)]
        return plot(rows, args.out)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import dpmjax.methods
    from dpmjax.config import configs_dir, load_config
    from dpmjax.data.few_shot import few_shot_target
    from dpmjax.metrics.few_shot import adaptation_scores
    from dpmjax.nn import quantize as nf4
    from dpmjax.workdir import load_params, load_teacher, sample_settings

    methods = args.only.split(",") if args.only else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    os.makedirs(args.out, exist_ok=True)
    teacher = load_teacher(teacher_workdir("digits"))
    target = few_shot_target("digits", "invert", 10)
    features = target_features("invert")
    x_T = jax.random.normal(jax.random.key(1234), (args.num, *teacher.image_shape))
    settings = sample_settings(teacher.config)
    rows = []

    def score(samples) -> dict:
        scores = adaptation_scores(samples, target.shots, target.heldout, features=features)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}

    source = sampler(teacher.model, teacher.schedule, teacher.prediction, settings)(teacher.params, x_T)
    rows.append({"method": "source", **score(source)})
    print(rows[-1], flush=True)
    # the cost of 4 bits alone: the teacher on its dequantised NF4 weights vs its float weights, scored in the
    # *source* domain (samples and targets inverted back: the features map images back by inverting them)
    source_target = few_shot_target("digits", "none", 10)
    dequantised = nf4.dequantize_tree(nf4.quantize_tree(teacher.params))
    for name, params in (("teacher_float@source", teacher.params), ("teacher_nf4@source", dequantised)):
        samples = sampler(teacher.model, teacher.schedule, teacher.prediction, settings)(params, x_T)
        scores = adaptation_scores(-np.asarray(samples), -source_target.shots, -source_target.heldout,
                                   features=features)
        rows.append({"method": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}})
        print(rows[-1], flush=True)
    rng = np.random.default_rng(0)
    rows.append({"method": "heldout", **score(target.heldout[rng.choice(len(target.heldout), min(args.num, 500),
                                                                        replace=False)])})
    print(rows[-1], flush=True)
    batch = {"image": jnp.asarray(target.shots[:8]), "label": jnp.zeros((8,), jnp.int32)}
    runs = [(m, m, "") for m in methods] + [(f"qst_r{r}", "qst", f",reduction={r}")
                                           for r in args.qst_reductions.split(",") if r]
    for run, method, variant in runs:
        config = load_config(os.path.join(configs_dir(), "methods", f"{method}.py") + f":steps={args.steps}{variant}")
        with config.unlocked():
            config.train.update(checkpoint_every=args.steps, log_every=max(1, args.steps // 4))
        entry = dpmjax.methods.get_method(method)
        entry.validate(config, teacher)
        cost = _cost(entry.build(config, teacher), batch, args.timed)
        print(run, cost, flush=True)
        workdir = os.path.join(args.out, "runs", run)
        shutil.rmtree(workdir, ignore_errors=True)
        start = time.time()
        dpmjax.methods.finetune(method, teacher, config, workdir, quiet=True)
        train_s = time.time() - start
        model, params, schedule, saved = load_params(workdir)
        samples = sampler(model, schedule, saved.train.target, sample_settings(saved))(params, x_T)
        grid(samples, os.path.join(args.out, f"grid_{run}.png"))
        rows.append({"method": run, "lr": config.optim.learning_rate, **cost, "train_s": round(train_s, 1),
                     **score(samples)})
        print(rows[-1], flush=True)
        jax.clear_caches()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(os.path.join(args.out, "cost.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out)


def plot(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rows if r.get("trainable") not in (None, "")]
    panels = (("trainable", "trainable params", True), ("peak_mib", "peak memory (MiB, XLA estimate)", False),
              ("step_ms", "median step (ms)", False), ("fd", "FD to held-out target (lower better)", False),
              ("copy_rate", "copy rate (share of samples copying a shot)", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for axis, (key, title, log) in zip(axes, panels):
        axis.bar([r["method"] for r in runs], [r[key] for r in runs], color=[f"C{i}" for i in range(len(runs))])
        axis.tick_params(axis="x", labelsize=7, rotation=30)
        if log:
            axis.set_yscale("log")
        if key == "fd":
            for ref, style in (("source", "--"), ("heldout", ":")):
                value = [r[key] for r in rows if r["method"] == ref]
                if value:
                    axis.axhline(value[0], ls=style, c="k", lw=1, label=ref)
            axis.legend(fontsize=7)
        axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cost.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
