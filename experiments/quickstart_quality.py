"""The main job's quality: candidate digits configs trained by dpmjax's own loop, sampled and scored as
``dpmjax quickstart`` scores them, and their training-step cost measured side by side.

    python experiments/quickstart_quality.py --only old_default,default          # train + score (~5 min each)
    python experiments/quickstart_quality.py --only default --seeds 0,1,2        # seed spread of one candidate
    python experiments/quickstart_quality.py --time --only old_default,default   # step cost, interleaved
    python experiments/quickstart_quality.py --list                              # the candidates

Candidates (``CANDIDATES`` below) are ``configs/digits.py`` plus section updates; ``old_default`` pins the
values the config had before this study (so it keeps reproducing the old numbers), ``default`` is the config
as it is now. Each candidate is trained by ``dpmjax.train.loop.train`` into ``<out>/runs/<name>-s<seed>``
(reused when finished), then its EMA params at each kept checkpoint are sampled by DPM-Solver++(2M) at
``--nfe`` (1000 samples, the config's spacing, seed 0) through ``dpmjax.metrics.report.quality_table`` -- the
function ``dpmjax quickstart`` prints -- and scored against the 355 held-out digits: Frechet distance in the
digits classifier's features and the share of samples it labels with confidence > 0.9. ``--ddpm`` adds the
quickstart's 1000-step ancestral DDPM row (250 samples). The real-data floor (1000 training vs the held-out
digits) is the table's first row.

``--time``: each candidate's jitted train step (the loop's model contract, loss, optimizer and EMA, on random
data of its batch) is compiled, then timed round-robin (``--rounds`` rounds of ``--per-round`` steps each), so
every candidate sees the same machine load; medians of per-step wall times, plus the compile time.

Writes ``<out>/quality.csv`` (one row per candidate, seed, checkpoint step and sampler; appended as rows
finish), ``<out>/step_cost.csv``, ``<out>/quality.png`` (Frechet distance at 10 NFE per candidate against the
floor and twice the floor) and ``<out>/samples_<name>.png`` (10-NFE samples of the last checkpoint).
Default ``<out>``: ``results/quickstart_quality`` (git-ignored).
"""
from __future__ import annotations

import argparse
import csv
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OUT = os.path.join(ROOT, "results", "quickstart_quality")

# The model of configs/digits.py before this study: 16 channels, 8x8 -> 4x4, self-attention at 4x4 and in the
# middle block (190,369 parameters).
OLD_UNET = dict(kind="unet", model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                num_heads=2, dropout=0.0, num_groups=8, mid_attention=True, bfloat16=False)
# Every other value configs/digits.py had before this study (so `old_default` reproduces it whatever the file says).
OLD = dict(model=OLD_UNET, schedule=dict(name="linear", num_train_timesteps=1000),
           data=dict(batch_size=128),
           optim=dict(learning_rate=2e-3, warmup_steps=100, decay="cosine", weight_decay=0.0, grad_clip=1.0),
           train=dict(num_steps=1500, target="eps", min_snr_gamma=0.0, ema_decay=0.995),
           sample=dict(solver="dpmpp_2m", nfe=10, spacing="logSNR"))


def _with(base: dict, **sections) -> dict:
    """``base`` with each section's fields updated (``model=`` with a ``kind`` replaces the whole model)."""
    out = {name: dict(fields) for name, fields in base.items()}
    for name, fields in sections.items():
        if name == "model" and "kind" in fields:
            out[name] = dict(fields)
        else:
            out.setdefault(name, {}).update(fields)
    return out


# name -> (section updates applied to configs/digits.py, what it tests). `default` applies nothing.
CANDIDATES = {
    "old_default": (OLD, "configs/digits.py before this study"),
    "default": ({}, "configs/digits.py as it is now"),
    # architectures, everything else as old_default
    "u16_noattn": (_with(OLD, model=dict(attention_resolutions=(), mid_attention=False)), "old UNet without attention"),
    "u32": (_with(OLD, model=dict(model_channels=32)), "old UNet at 32 channels"),
    "u32_noattn": (_with(OLD, model=dict(model_channels=32, attention_resolutions=(), mid_attention=False)),
                   "32 channels, no attention"),
    "u32_nrb2": (_with(OLD, model=dict(model_channels=32, num_res_blocks=2)), "32 channels, 2 ResBlocks per level"),
    "u16_122": (_with(OLD, model=dict(channel_mult=(1, 2, 2), attention_resolutions=(4, 2))),
                "old UNet with a third level (8 -> 4 -> 2)"),
    "u48_noattn": (_with(OLD, model=dict(model_channels=48, attention_resolutions=(), mid_attention=False)),
                   "48 channels, no attention"),
    "dit_p2_w128_d4": (_with(OLD, model=dict(kind="dit", patch_size=2, hidden_size=128, depth=4, num_heads=4,
                                             freq_dim=128, bfloat16=False)), "DiT, 2x2 patches (16 tokens)"),
    "dit_p1_w64_d4": (_with(OLD, model=dict(kind="dit", patch_size=1, hidden_size=64, depth=4, num_heads=4,
                                            freq_dim=64, bfloat16=False)), "DiT, 1x1 patches (64 tokens)"),
    "dit_p2_w192_d6": (_with(OLD, model=dict(kind="dit", patch_size=2, hidden_size=192, depth=6, num_heads=6,
                                             freq_dim=192, bfloat16=False)), "DiT, 2x2 patches, wider and deeper"),
    # training recipe on the old UNet
    "cosine": (_with(OLD, schedule=dict(name="cosine")), "cosine DDPM betas (Nichol & Dhariwal 2021)"),
    "minsnr5": (_with(OLD, train=dict(min_snr_gamma=5.0)), "min-SNR-5 weighting (Hang et al. 2023)"),
    "v": (_with(OLD, train=dict(target="v")), "v-prediction (Salimans & Ho 2022)"),
    "ema999": (_with(OLD, train=dict(ema_decay=0.999)), "EMA 0.999"),
    "lr1e-3": (_with(OLD, optim=dict(learning_rate=1e-3)), "learning rate 1e-3"),
    "lr4e-3": (_with(OLD, optim=dict(learning_rate=4e-3)), "learning rate 4e-3"),
    "b64": (_with(OLD, data=dict(batch_size=64)), "batch 64"),
    "b256": (_with(OLD, data=dict(batch_size=256)), "batch 256"),
    # the UNet without attention (u16_noattn) with v-prediction, then one change at a time
    "na_v": (_with(OLD, model=dict(attention_resolutions=(), mid_attention=False), train=dict(target="v")),
             "no attention, v-prediction"),
}
NA_V = CANDIDATES["na_v"][0]
CANDIDATES.update({
    "na_v_lr4e-3": (_with(NA_V, optim=dict(learning_rate=4e-3)), "na_v, learning rate 4e-3"),
    "na_v_b2": (_with(NA_V, optim=dict(b2=0.99)), "na_v, Adam beta2 0.99"),
    "na_v_2000": (_with(NA_V, train=dict(num_steps=2000)), "na_v, 2000 steps"),
    "na_v_minsnr5": (_with(NA_V, train=dict(min_snr_gamma=5.0)), "na_v, min-SNR-5 weighting"),
    "na_v_b64": (_with(NA_V, data=dict(batch_size=64)), "na_v, batch 64"),
    "na_v_b64_3000": (_with(NA_V, data=dict(batch_size=64), train=dict(num_steps=3000)), "na_v, batch 64, 3000 steps"),
    "na_v_b256": (_with(NA_V, data=dict(batch_size=256)), "na_v, batch 256"),
    "na_v_lr8e-3": (_with(NA_V, optim=dict(learning_rate=8e-3)), "na_v, learning rate 8e-3"),
})
NA_V4 = _with(NA_V, optim=dict(learning_rate=4e-3))
CANDIDATES.update({
    "na_v4_b64_3000": (_with(NA_V4, data=dict(batch_size=64), train=dict(num_steps=3000)),
                       "na_v, lr 4e-3, batch 64, 3000 steps"),
    "na_v4_minsnr5": (_with(NA_V4, train=dict(min_snr_gamma=5.0)), "na_v, lr 4e-3, min-SNR-5"),
    "na_v4_2000": (_with(NA_V4, train=dict(num_steps=2000)), "na_v, lr 4e-3, 2000 steps"),
    "na_v4_b256_1000": (_with(NA_V4, data=dict(batch_size=256), train=dict(num_steps=1000)),
                        "na_v, lr 4e-3, batch 256, 1000 steps"),
    "na_v8_b256_1000": (_with(NA_V4, data=dict(batch_size=256), train=dict(num_steps=1000),
                              optim=dict(learning_rate=8e-3)), "na_v, lr 8e-3, batch 256, 1000 steps"),
    "na_v4_2000_minsnr5": (_with(NA_V4, train=dict(num_steps=2000, min_snr_gamma=5.0)),
                           "na_v, lr 4e-3, 2000 steps, min-SNR-5"),
    "na_v4_2000_cos": (_with(NA_V4, train=dict(num_steps=2000), schedule=dict(name="cosine")),
                       "na_v, lr 4e-3, 2000 steps, cosine betas"),
    "na_v4_2000_cosvp": (_with(NA_V4, train=dict(num_steps=2000), schedule=dict(name="cosine_vp")),
                         "na_v, lr 4e-3, 2000 steps, continuous cosine VP schedule"),
    "na_v4_2000_ema999": (_with(NA_V4, train=dict(num_steps=2000, ema_decay=0.999)),
                          "na_v, lr 4e-3, 2000 steps, EMA 0.999"),
    "na_v4_2500": (_with(NA_V4, train=dict(num_steps=2500)), "na_v, lr 4e-3, 2500 steps"),
    "na_v4_122_2000": (_with(NA_V4, model=dict(channel_mult=(1, 2, 2)), train=dict(num_steps=2000)),
                       "na_v, lr 4e-3, 2000 steps, a third level (8 -> 4 -> 2)"),
    "na_v4_2000_ema99": (_with(NA_V4, train=dict(num_steps=2000, ema_decay=0.99)),
                         "na_v, lr 4e-3, 2000 steps, EMA 0.99"),
    "na_v4_13": (_with(NA_V4, model=dict(channel_mult=(1, 3))), "na_v, lr 4e-3, 48 channels at 4x4"),
    "na_v4_14": (_with(NA_V4, model=dict(channel_mult=(1, 4))), "na_v, lr 4e-3, 64 channels at 4x4"),
    "na12_v4_13": (_with(NA_V4, model=dict(model_channels=12, channel_mult=(1, 3), num_groups=4)),
                   "na_v, lr 4e-3, 12 channels at 8x8, 36 at 4x4"),
    "na24_v4": (_with(NA_V4, model=dict(model_channels=24)), "na_v, lr 4e-3, 24 channels"),
    "na_v4_122": (_with(NA_V4, model=dict(channel_mult=(1, 2, 2))), "na_v, lr 4e-3, a third level (8 -> 4 -> 2)"),
    "na_v4_nrb2": (_with(NA_V4, model=dict(num_res_blocks=2)), "na_v, lr 4e-3, 2 ResBlocks per level"),
    "na_v4_mid": (_with(NA_V4, model=dict(mid_attention=True)), "na_v, lr 4e-3, attention in the middle block only"),
})


# ------------------------------------------------------------------------------------------------ configs

def candidate_config(name: str, seed: int = 0):
    """The locked ConfigDict of candidate ``name`` (configs/digits.py + its section updates) with ``seed``."""
    from dpmjax.config import load_config, validate_config

    if name not in CANDIDATES:
        raise ValueError(f"unknown candidate {name!r}; choose from {list(CANDIDATES)}")
    config = load_config(os.path.join(ROOT, "configs", "digits.py"))
    with config.unlocked():
        for section, fields in CANDIDATES[name][0].items():
            if section == "model" and "kind" in fields:
                config.model = dict(fields)
            else:
                config[section].update(dict(fields))
        config.seed = int(seed)
        # keep every checkpoint of the run (at most 4: the learning curve at no extra training cost)
        config.train.checkpoint_every = max(1, config.train.num_steps // 3)
        config.train.keep_checkpoints = 4
    validate_config(config)
    return config


def count_params(config) -> int:
    import jax

    from dpmjax.nn import build_model, count_params as count, init_params

    model = build_model(config.model)
    return count(jax.eval_shape(lambda: init_params(model, tuple(config.data.image_shape), 0))["params"])


def load_text() -> str:
    return "%.1f/%.1f/%.1f" % os.getloadavg()


# ------------------------------------------------------------------------------------------------ training + scores

QUALITY_FIELDS = ("candidate", "seed", "sample_seed", "step", "weights", "params", "solver", "spacing", "nfe", "num", "frechet",
                  "confident_share",
                  "floor_frechet", "floor_confident_share", "train_seconds", "sample_seconds", "load", "note")


def _append(path: str, fields, row: dict):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def train_candidate(name: str, seed: int, out: str) -> tuple[str, float]:
    """(workdir, training seconds incl. compile; NaN when reused) of candidate ``name`` with ``seed``."""
    from dpmjax.train.loop import train
    from dpmjax.workdir import checkpoint_steps

    config = candidate_config(name, seed)
    workdir = os.path.join(out, "runs", f"{name}-s{seed}")
    try:
        if checkpoint_steps(workdir)[-1] == config.train.num_steps:
            return workdir, float("nan")
    except FileNotFoundError:
        pass
    start = time.perf_counter()
    train(config, workdir, quiet=True)
    return workdir, time.perf_counter() - start


def score_candidate(name: str, seed: int, out: str, nfes, ddpm: bool, all_steps: bool, spacings=None,
                    raw: bool = False, sample_seeds=(0,)):
    """Train (or reuse) and score every kept checkpoint (the last only unless ``all_steps``), on the config's
    time-grid spacing or each of ``spacings``, with the EMA weights (and the raw weights when ``raw``)."""
    import numpy as np

    from dpmjax.metrics import report
    from dpmjax.nn import make_apply_fn
    from dpmjax.workdir import checkpoint_steps, load_params

    workdir, train_seconds = train_candidate(name, seed, out)
    config = candidate_config(name, seed)
    params_count = count_params(config)
    print(f"{name} seed {seed}: {params_count:,} params, trained in {train_seconds:.0f} s (load {load_text()})",
          flush=True)
    steps = checkpoint_steps(workdir)
    steps = steps if all_steps else steps[-1:]
    rows = []
    spacings = list(spacings or [config.sample.spacing])
    for step, weights, spacing, sample_seed in [(s, w, sp, ss) for s in steps
                                                for w in (("ema", "raw") if raw else ("ema",))
                                                for sp in spacings for ss in sample_seeds]:
        model, variables, schedule, trained = load_params(workdir, step=step, use_ema=weights == "ema")
        last = step == steps[-1] and weights == "ema" and spacing == spacings[0] and sample_seed == sample_seeds[0]
        table, samples, _ = report.quality_table(
            make_apply_fn(model, schedule), schedule, trained, solvers=[str(trained.sample.solver)], nfes=nfes,
            num=1000, ddpm_steps=1000 if (ddpm and last) else None, ddpm_num=250, params=variables,
            spacing=str(spacing), prediction=str(trained.train.target), progress=False, seed=sample_seed,
            log=lambda text: print(f"  step {step} {weights} {spacing} seed {sample_seed}: {text}", flush=True))
        floor = table[0]
        for row in table[1:]:
            full = dict(candidate=name, seed=seed, sample_seed=sample_seed, step=step, weights=weights, params=params_count,
                        solver=row["solver"], spacing=spacing if row["solver"] != "ddpm" else "training steps",
                        nfe=row["nfe"], num=row["num"], frechet=round(float(row["frechet"]), 4),
                        confident_share=round(float(row["confident_share"]), 4),
                        floor_frechet=round(float(floor["frechet"]), 4),
                        floor_confident_share=round(float(floor["confident_share"]), 4),
                        train_seconds=round(train_seconds, 1), sample_seconds=round(float(row["seconds"]), 1),
                        load=load_text(), note=CANDIDATES[name][1])
            _append(os.path.join(out, "quality.csv"), QUALITY_FIELDS, full)
            rows.append(full)
        if last and (str(trained.sample.solver), 10) in samples:
            report.image_grid(np.asarray(samples[(str(trained.sample.solver), 10)]),
                              os.path.join(out, f"samples_{name}-s{seed}.png"))
    return rows


# ------------------------------------------------------------------------------------------------ step cost

def jax_step_fn(config):
    """``run()``: one step of the loop's jitted train step for ``config`` on random data of its batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dpmjax.nn import build_model, init_params, network_time
    from dpmjax.schedules import schedule_from_config
    from dpmjax.sharding import make_mesh, replicated
    from dpmjax.train import optim
    from dpmjax.train.state import create_train_state
    from dpmjax.train.step import make_train_step

    shape = tuple(config.data.image_shape)
    mesh = make_mesh(1)
    schedule = schedule_from_config(config.schedule)
    model = build_model(config.model)
    params = init_params(model, shape, config.seed)
    tx = optim.make_optimizer(total_steps=config.train.num_steps, **dict(config.optim))
    state = jax.device_put(create_train_state(params, tx, config.seed), replicated(mesh))

    def train_apply_fn(params, x_t, t, y, key):  # the training loop's model contract (dpmjax.train.loop)
        return model.apply(params, x_t, network_time(schedule, t), y=None, train=True, rngs={"dropout": key})

    gamma = float(config.train.min_snr_gamma)
    step = make_train_step(train_apply_fn, tx, schedule, mesh, target=config.train.target,
                           min_snr_gamma=gamma if gamma > 0 else None, ema_decay=config.train.ema_decay)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (config.data.batch_size,) + shape), jnp.float32)}
    holder = {"state": state, "metrics": None}

    def run():
        holder["state"], holder["metrics"] = step(holder["state"], batch, holder["metrics"])
        jax.block_until_ready(holder["metrics"])

    return run


def time_candidates(names, out: str, rounds: int, per_round: int):
    import numpy as np

    runs, compile_seconds = {}, {}
    for name in names:
        start = time.perf_counter()
        runs[name] = jax_step_fn(candidate_config(name))
        runs[name]()
        compile_seconds[name] = time.perf_counter() - start
        print(f"{name}: compiled + first step {compile_seconds[name]:.1f} s", flush=True)
    times = {name: [] for name in names}
    loads = []
    for _ in range(rounds):
        for name in names:
            runs[name]()  # one untimed step: the cache warms after the other candidates ran
            for _ in range(per_round):
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
    rows = []
    for name in names:
        config = candidate_config(name)
        median = float(np.median(times[name]))
        rows.append(dict(candidate=name, params=count_params(config), batch=config.data.batch_size,
                         num_steps=config.train.num_steps, step_ms_median=round(1e3 * median, 2),
                         step_ms_min=round(1e3 * min(times[name]), 2),
                         train_seconds_est=round(median * config.train.num_steps, 1),
                         compile_seconds=round(compile_seconds[name], 1),
                         load_min=round(min(loads), 2), load_max=round(max(loads), 2), note=CANDIDATES[name][1]))
    path = os.path.join(out, "step_cost.csv")
    for row in rows:
        _append(path, list(rows[0]), row)
        print(f"{row['candidate']:<24} {row['params']:>9,} params  batch {row['batch']:>4}  "
              f"{row['step_ms_median']:7.1f} ms/step (min {row['step_ms_min']:.1f})  x {row['num_steps']} steps = "
              f"{row['train_seconds_est']:6.1f} s  compile {row['compile_seconds']:.0f} s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ outputs

def plot(out: str):
    """quality.png: Frechet distance at 10 NFE (last checkpoint, mean over seeds) per candidate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = os.path.join(out, "quality.csv")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["solver"] != "ddpm" and int(r["nfe"]) == 10]
    if not rows:
        return
    last = {}
    for r in rows:  # the last checkpoint of each (candidate, seed), the latest row written
        key = (r["candidate"], r["seed"])
        if key not in last or int(r["step"]) >= int(last[key]["step"]):
            last[key] = r
    names = list(dict.fromkeys(r["candidate"] for r in last.values()))
    values = [[float(r["frechet"]) for (c, _), r in last.items() if c == name] for name in names]
    floor = float(np.median([float(r["floor_frechet"]) for r in rows]))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(names) + 2), 3.8))
    ax.bar(range(len(names)), [np.mean(v) for v in values], color="tab:blue")
    for i, v in enumerate(values):
        ax.plot([i] * len(v), v, "k.", ms=4)
    ax.axhline(floor, ls=":", c="k", label=f"real floor {floor:.2f}")
    ax.axhline(2 * floor, ls="--", c="tab:red", label="2 x floor (goal)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("Frechet distance, DPM-Solver++(2M) 10 NFE")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality.png"), dpi=120)
    plt.close(fig)


def summary(out: str, nfe: int = 10):
    """Print mean / min / max Frechet distance at ``nfe`` per (candidate, spacing) over every training and sampling
    seed in quality.csv (last checkpoint, EMA weights), with the number of (seed, sample seed) pairs."""
    import numpy as np

    with open(os.path.join(out, "quality.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["solver"] != "ddpm" and int(r["nfe"]) == nfe
                and r.get("weights", "ema") == "ema"]
    last = {}
    for r in rows:
        last[r["candidate"], r["seed"]] = max(last.get((r["candidate"], r["seed"]), 0), int(r["step"]))
    groups = {}
    for r in rows:
        if int(r["step"]) == last[r["candidate"], r["seed"]]:
            key = (r["candidate"], r["spacing"])
            groups.setdefault(key, {})[(r["seed"], r.get("sample_seed", "0"))] = (float(r["frechet"]),
                                                                                float(r["confident_share"]))
    print(f"{'candidate':<24} {'spacing':<15} {'n':>3} {'FD mean':>8} {'min':>6} {'max':>6} {'conf':>6}  "
          f"(NFE {nfe}; n = training seed x sample seed pairs)")
    for (name, spacing), values in groups.items():
        fd = np.array([v[0] for v in values.values()])
        conf = np.mean([v[1] for v in values.values()])
        print(f"{name:<24} {spacing:<15} {len(fd):>3} {fd.mean():8.2f} {fd.min():6.2f} {fd.max():6.2f} {conf:6.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="old_default,default", help="comma-separated candidates")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--nfe", default="5,10,20", help="DPM-Solver++(2M) NFEs")
    parser.add_argument("--ddpm", action="store_true", help="add the 1000-step DDPM row (250 samples; slow)")
    parser.add_argument("--all-steps", action="store_true", help="score every kept checkpoint, not only the last")
    parser.add_argument("--spacings", default=None,
                        help="comma-separated time-grid spacings to score (default: the config's sample.spacing)")
    parser.add_argument("--raw", action="store_true", help="also score the raw (non-EMA) weights")
    parser.add_argument("--sample-seeds", default="0",
                        help="comma-separated seeds of the sampling noise (quickstart uses 0); each adds a set of rows")
    parser.add_argument("--time", action="store_true", help="measure step cost (interleaved) instead of training")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--summary", action="store_true", help="print the mean Frechet distance per candidate and "
                        "spacing over all seeds in quality.csv, then exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (_, note) in CANDIDATES.items():
            print(f"{name:<24} {note}")
        return
    if args.summary:
        summary(args.out)
        return
    names = [n for n in args.only.split(",") if n]
    for name in names:
        candidate_config(name)  # unknown names and bad values fail here, before anything trains
    os.makedirs(args.out, exist_ok=True)
    if args.time:
        time_candidates(names, args.out, args.rounds, args.per_round)
        return
    nfes = [int(n) for n in args.nfe.split(",")]
    for name in names:
        for seed in (int(s) for s in args.seeds.split(",")):
            score_candidate(name, seed, args.out, nfes, args.ddpm, args.all_steps,
                            args.spacings.split(",") if args.spacings else None, args.raw,
                            [int(x) for x in args.sample_seeds.split(",")])
            plot(args.out)


if __name__ == "__main__":
    main()
