"""SpeedUpNet (dpmjax/methods/speedupnet.py): 4 steps without guidance vs the teacher with guidance, and the adapter
plugged into a second finetune of the base without retraining.

    python experiments/speedupnet.py      # CSV + PNG in results/speedupnet/; SUN_STEPS=N updates (400)
                                          # (+ the teacher, once: configs/digits.py:xattn, 2000 steps)

1. Base A: the digits UNet whose labels enter only through cross-attention (``configs/digits.py:xattn``: 2 label
   tokens, attention at 4x4 and in the middle), trained once and cached by ``_teachers.teacher_workdir``.
2. Base B: A finetuned on bold digits (``style:digits:dilate``, the whole training split, ``--method full_finetune``,
   label dropout kept, 600 updates): "a second finetuned copy of the base model".
3. SUN adapters trained on A only (``--method speedupnet``, guidance w = 2 folded in, 4 DDIM student steps, a
   20-step guided DPM-Solver++(2M) teacher): MSC with m = 2 (the default) and the m = 1 ablation (step-wise
   trajectory distillation).
4. For A and B, from the same noises and labels (100 per class): the reference (guided DPM-Solver++(2M), 20 steps,
   40 passes), guided DDIM at 4 steps (8 passes) and at 2 steps (4 passes, the equal-cost baseline), unguided DDIM
   at 4 steps (4 passes), and SUN at 4 steps (4 passes; on B the adapter trained on A, plugged without training).
   Scores: MSE to the reference sample of the same noise (consistency), Frechet distance in the digits classifier's
   features to the reference samples (does it reproduce the guided distribution?) and to the real test split
   (dilated for B), the share of samples the classifier names as their label and its mean probability of that
   label (what guidance buys), passes per image and the measured wall time per image (jitted, 250 images, timed
   round-robin over all samplers, median of 7 rounds).
"""
from __future__ import annotations

import csv
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "results", "speedupnet")

NUM_PER_CLASS = 100
GUIDANCE = 2.0
BASE_B_STEPS = 600
SUN_STEPS = int(os.environ.get("SUN_STEPS", 400))
REFERENCE = ("dpmpp_2m", 20)


def finetune_once(method, teacher, config, workdir):
    """Run ``dpmjax.methods.finetune`` unless ``workdir`` already holds its final checkpoint."""
    import dpmjax.methods
    from dpmjax.workdir import checkpoint_steps

    try:
        if checkpoint_steps(workdir)[-1] >= config.train.num_steps:
            return
    except FileNotFoundError:
        pass
    start = time.time()
    dpmjax.methods.finetune(method, teacher, config, workdir, num_devices=1)
    print(f"{method} -> {workdir}: {time.time() - start:.0f} s", flush=True)


def base_b_config():
    from dpmjax.config import configs_dir, load_config

    config = load_config(os.path.join(configs_dir(), "methods", "full_finetune.py")
                         + f":target=style:digits:dilate,steps={BASE_B_STEPS}")
    with config.unlocked():
        config.data.shots = None  # the whole bold-digits training split: a style finetune, not few-shot
        config.data.batch_size = 64
        config.train.update(log_every=100, checkpoint_every=BASE_B_STEPS)
    return config


def sun_config(msc):
    from dpmjax.config import configs_dir, load_config

    return load_config(os.path.join(configs_dir(), "methods", "speedupnet.py")
                       + f":steps={SUN_STEPS},msc={msc},w={GUIDANCE}")


def samplers(teacher):
    """{name: (jitted (params, x_T, y) -> x_0, passes per image, uses the adapted model)}."""
    import jax
    import jax.numpy as jnp

    from dpmjax.methods import speedupnet
    from dpmjax.nn import build_model, make_apply_fn, make_cfg_apply_fn
    from dpmjax.samplers.driver import plan, sample

    schedule, prediction = teacher.schedule, teacher.prediction
    spacing = str(teacher.config.sample.spacing)
    guided = make_cfg_apply_fn(teacher.model, schedule, GUIDANCE)
    plain = make_apply_fn(teacher.model, schedule)
    adapted = make_apply_fn(build_model(speedupnet.student_model_config(teacher)), schedule)

    def make(apply, solver, steps):
        times = plan(schedule, solver, nfe=steps, spacing=spacing).grid["t"]

        @jax.jit
        def run(params, x_T, y):
            return jnp.clip(sample(lambda x, t: apply(params, x, t, y=y), x_T, schedule=schedule, solver=solver,
                                   timesteps=times, prediction=prediction), -1.0, 1.0)

        return run

    def cfg(params, x, t, y):
        return guided(params, x, t, y)

    return {
        f"reference: guided {REFERENCE[0]} {REFERENCE[1]} steps": (make(cfg, *REFERENCE), 2 * REFERENCE[1], False),
        "guided ddim 4 steps": (make(cfg, "ddim", 4), 8, False),
        "guided ddim 2 steps": (make(cfg, "ddim", 2), 4, False),
        "unguided ddim 4 steps": (make(plain, "ddim", 4), 4, False),
        "SUN ddim 4 steps": (make(adapted, "ddim", 4), 4, True),
    }


def wall_times(entries, x_T, y, rounds=7):
    """Seconds per image of each (run, params), timed round-robin (every round times every sampler once, so load
    changes hit all alike); the median over rounds."""
    import jax
    import numpy as np

    for run, params in entries:
        jax.block_until_ready(run(params, x_T, y))
    times = np.zeros((rounds, len(entries)))
    for r in range(rounds):
        for i, (run, params) in enumerate(entries):
            start = time.perf_counter()
            jax.block_until_ready(run(params, x_T, y))
            times[r, i] = time.perf_counter() - start
    return np.median(times, axis=0) / x_T.shape[0]


def main():
    import jax
    import numpy as np

    from _adaptation import grid
    from _teachers import real_split, teacher_workdir

    from dpmjax.data.few_shot import style_transform
    from dpmjax.methods import speedupnet
    from dpmjax.metrics.domain import domain_metric
    from dpmjax.workdir import load_params, load_teacher

    os.makedirs(OUT, exist_ok=True)
    teacher_a = load_teacher(teacher_workdir("digits", variant="xattn"))
    base_b_dir = os.path.join(OUT, "base_b_dilate")
    finetune_once("full_finetune", teacher_a, base_b_config(), base_b_dir)
    _, base_b, _, _ = load_params(base_b_dir)
    adapters = {}
    for msc in (2, 1):
        workdir = os.path.join(OUT, f"sun_msc{msc}")
        finetune_once("speedupnet", teacher_a, sun_config(msc), workdir)
        _, student, _, _ = load_params(workdir)
        adapters[msc] = speedupnet.adapter_of(student)  # the adapter's leaves, as trained

    metric = domain_metric("digits")
    real, _ = real_split("digits", "test")
    real_by_base = {"A (base)": real, "B (bold finetune)": style_transform(real, "dilate")}
    labels = np.repeat(np.arange(10), NUM_PER_CLASS).astype(np.int32)
    x_T = jax.random.normal(jax.random.key(2026), (len(labels),) + teacher_a.image_shape)
    runs = samplers(teacher_a)
    rows, images, timed = [], {}, []
    for base_name, base in (("A (base)", teacher_a.params), ("B (bold finetune)", base_b)):
        reference = None
        entries = [(name, run, passes, needs_adapter, None) for name, (run, passes, needs_adapter) in runs.items()]
        entries += [("SUN ddim 4 steps, msc=1", runs["SUN ddim 4 steps"][0], 4, True, 1)]
        for name, run, passes, needs_adapter, msc in entries:
            params = speedupnet.plug(base, adapters[msc or 2]) if needs_adapter else base
            out = np.asarray(run(params, x_T, labels))
            if reference is None:
                reference = out
            logits, _ = metric._apply(out)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            row = dict(base=base_name, sampler=name, passes_per_image=passes,
                       adapter=("trained on A" if base_name.startswith("A") else "plugged from A, no training")
                       if needs_adapter else "",
                       mse_to_reference=float(np.mean((out - reference) ** 2)),
                       fd_to_reference=metric.frechet(out, reference) if out is not reference else 0.0,
                       fd_to_data=metric.frechet(out, real_by_base[base_name]),
                       label_match=float(np.mean(logits.argmax(-1) == labels)),
                       label_prob=float(np.mean(probs[np.arange(len(labels)), labels])))
            rows.append(row)
            timed.append((run, params))
            images[(base_name, name)] = out
            print(row, flush=True)
    for row, seconds in zip(rows, wall_times(timed, x_T[:250], labels[:250])):
        row["ms_per_image"] = 1000 * float(seconds)
    with open(os.path.join(OUT, "speedupnet.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    order = np.concatenate([np.arange(c * NUM_PER_CLASS, c * NUM_PER_CLASS + 2) for c in range(10)])  # 2 per class
    for base_name in real_by_base:
        tag = "a" if base_name.startswith("A") else "b"
        shown = [f"reference: guided {REFERENCE[0]} {REFERENCE[1]} steps", "guided ddim 4 steps",
                 "unguided ddim 4 steps", "SUN ddim 4 steps"]
        grid(np.concatenate([images[(base_name, name)][order] for name in shown]),
             os.path.join(OUT, f"samples_{tag}.png"), columns=20)
    print(f"rows: reference / guided 4 / unguided 4 / SUN 4 -> {OUT}/samples_a.png, samples_b.png")


if __name__ == "__main__":
    main()
