"""DPM-OT: an optimal-transport "expressway" from the prior noise to noised data, then a short solver chain.

    dpmjax finetune --method dpm_ot --config configs/methods/dpm_ot.py --teacher runs/digits --workdir runs/digits_ot
    images = sample_workdir("runs/digits_ot", num=64, seed=0)        # OT map + k solver steps

Li, Li, Wang, Lei, Luo & Gu, "DPM-OT: A New Diffusion Probabilistic Model Guided by Optimal Transport", ICCV 2023
(arXiv 2307.11308; official PyTorch code github.com/cognaclee/DPM-OT, its OT solver "modified from AE-OT").

Targets (official ``forward_diffusion``). n training images x_i, noised once to the intermediate time t_k of the
teacher's schedule, in the VP form of the official NCSN y = x + sigma z:

    y_i = alpha(t_k) x_i + sigma(t_k) z_i,   z_i ~ N(0, I),   i = 1..n     (fixed for the run: the state holds them)

Semi-discrete OT (Gu, Lei et al. 2016, "Variational principles for Minkowski type problems, discrete optimal
transport, and discrete Monge-Ampere equations"; AE-OT, An et al. ICLR 2020). The Brenier potential of the
source measure mu onto nu = (1/n) sum_i delta_{y_i} is u_h(x) = max_i <x, y_i> + h_i; its gradient map is

    T(x) = y_{argmax_i <x, y_i> + h_i}                                       (the power cell W_i(h) goes to y_i)

and the heights h minimise the convex energy E(h) = int u_h dmu - sum_i h_i / n, whose gradient is

    dE/dh_i = mu(W_i(h)) - 1/n.

mu(W_i(h)) is estimated by Monte Carlo, as the official code: draw ``mc_batches`` batches of ``mc_batch`` source
samples, assign each to its cell (argmax), count (bincount) and divide by the number drawn. One update of the
finetune loop is one Adam step on h with that gradient (official: lr_ot = 0.1, beta = 0.9 / 0.999, eps = 1e-8),
followed by h <- h - mean(h) (E is invariant to a constant shift of h).

Sampling (the "expressway"): x_T ~ N(0, I), x_{t_k} = T(x_T), then any registered solver from t_k to the end in
k model evaluations. The OT map itself costs one [B, d] x [d, n] product, no model call: NFE = k.

Departures from the official code, and why:
  * Source measure: the official estimates the cell masses with ``torch.rand`` (uniform on [0, 1]^d; ``randn``
    is commented out), but then the heights give equal masses under the uniform measure, not under the noise one
    samples from. Here the source is the sampler's prior N(0, I) at t = 1, both to fit h and to sample, so every
    target is drawn with probability 1/n when sampling (the tests check the masses under N(0, I)).
  * Noise level: the official picks sigma_{L - backSteps} of NCSN's 232 geometric sigmas and runs the last
    backSteps Langevin levels. Here t_k is either given (``method.t_k`` > 0) or the time at which a
    ``reference_nfe``-step grid of the same spacing (from the schedule's start to its end) has k steps left:
    the same "last k steps of a long chain" rule on the solver's grid.
  * Fixed budget: the official stops when ||grad|| < 8e-4 with no empty cell and doubles the MC batch when the
    energy stagnates; the finetune loop runs ``train.num_steps`` updates with a fixed MC batch (fixed shapes: one
    compiled step) and logs ||grad||, the empty-cell share and the largest cell's mass x n. The MC noise floor of
    ||grad|| is about 1 / sqrt(mc_batch * mc_batches).
  * Top-1 only: the official's top-k interpolation between neighbouring targets (with an angle threshold) is not
    implemented. With top-1, T returns a *noised training image*; only the short chain adds diversity, so the
    nearest-training-image distance of the samples is the memorisation check (``experiments/dpm_ot.py``).

OT solver in jnp rather than OTT-JAX: OTT-JAX (``ott-jax``, not installed here) solves discrete (Sinkhorn,
entropic) and neural-dual problems between sample sets; it has no semi-discrete solver with an exact
(unregularised) power-diagram map and MC cell masses. The semi-discrete dual ascent is a matmul, an argmax, a
bincount and ``optax.adam`` (about 40 lines below), so no dependency is added.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dpmjax.methods.base import Method, Program, Teacher
from dpmjax.train.optim import optimizer_step

__all__ = ["METHOD", "OTState", "ot_scores", "ot_assign", "ot_map", "cell_masses", "monte_carlo_cell_masses",
           "ot_optimizer", "ot_step", "fit_heights", "resolve_t_k", "make_targets", "sample", "make_sampler",
           "load_workdir", "sample_workdir", "build", "validate"]

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # the official hand-written Adam on h


@struct.dataclass
class OTState:
    """The method's state: the frozen teacher's variables (so the workdir is self-contained), the targets and
    the fitted heights with their Adam state."""

    variables: Any      # the teacher's network variables {"params": ...}, unchanged
    targets: jax.Array  # [n, H, W, C] float32: y_i = alpha(t_k) x_i + sigma(t_k) z_i
    heights: jax.Array  # [n] float32: h, mean zero
    opt_state: Any      # optax.adam state of h


# ------------------------------------------------------------------------------------------------ the OT map

def ot_scores(x, targets, heights):
    """<x, y_i> + h_i for every source point and target: [B, n] (x [B, ...], targets [n, ...], heights [n])."""
    x_flat = x.reshape(x.shape[0], -1)
    y_flat = targets.reshape(targets.shape[0], -1).astype(x_flat.dtype)
    return x_flat @ y_flat.T + heights.astype(x_flat.dtype)[None, :]


def ot_assign(x, targets, heights):
    """The power cell of each source point: argmax_i <x, y_i> + h_i, int32 [B]."""
    return jnp.argmax(ot_scores(x, targets, heights), axis=-1).astype(jnp.int32)


def ot_map(x, targets, heights):
    """T(x) = y_{argmax_i <x, y_i> + h_i} = grad u_h(x): [B, ...] (target-shaped), in x's dtype."""
    return targets[ot_assign(x, targets, heights)].astype(x.dtype)


def cell_masses(x, targets, heights):
    """The empirical measure of each power cell: bincount(argmax) / B over the source points x, [n]."""
    counts = jnp.bincount(ot_assign(x, targets, heights), length=targets.shape[0])
    return counts.astype(jnp.float32) / x.shape[0]


def monte_carlo_cell_masses(key, targets, heights, *, mc_batch: int, mc_batches: int = 1):
    """mu(W_i(h)) for mu = N(0, I), estimated from ``mc_batches`` batches of ``mc_batch`` fresh samples (one
    batch's [mc_batch, n] scores in memory at a time), [n] float32."""
    n = targets.shape[0]
    shape = (mc_batch,) + tuple(targets.shape[1:])

    def one_batch(counts, batch_key):
        x = jax.random.normal(batch_key, shape, jnp.float32)
        return counts + jnp.bincount(ot_assign(x, targets, heights), length=n), None

    counts, _ = jax.lax.scan(one_batch, jnp.zeros((n,), jnp.int32), jax.random.split(key, mc_batches))
    return counts.astype(jnp.float32) / float(mc_batch * mc_batches)


def ot_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Adam on the heights with the official constants (beta 0.9 / 0.999, eps 1e-8)."""
    return optax.adam(learning_rate, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)


def ot_step(heights, opt_state, targets, key, *, optimizer, mc_batch: int, mc_batches: int = 1):
    """One step of the semi-discrete dual: g_i = mu(W_i(h)) - 1/n (MC), h <- Adam(h, g), h <- h - mean(h).

    Returns (heights, opt_state, scalars): ``grad_norm`` ||g||_2 at the old h, ``empty_cells`` the share of
    targets whose cell got no sample, ``max_mass_ratio`` n max_i mu(W_i) (1 when all masses are equal).
    """
    n = targets.shape[0]
    masses = monte_carlo_cell_masses(key, targets, heights, mc_batch=mc_batch, mc_batches=mc_batches)
    grad = masses - 1.0 / n
    heights, opt_state = optimizer_step(optimizer, grad, opt_state, heights)
    heights = heights - jnp.mean(heights)
    scalars = {"grad_norm": jnp.linalg.norm(grad), "empty_cells": jnp.mean((masses == 0).astype(jnp.float32)),
               "max_mass_ratio": n * jnp.max(masses)}
    return heights, opt_state, scalars


def fit_heights(targets, key, *, num_steps: int, learning_rate: float = 0.1, mc_batch: int = 4096,
                mc_batches: int = 1, heights=None):
    """``num_steps`` of ``ot_step`` from h = 0 (or ``heights``) in one ``lax.scan``: (heights [n], scalars of
    every step). The finetune loop runs the same step one update at a time."""
    optimizer = ot_optimizer(learning_rate)
    heights = jnp.zeros((targets.shape[0],), jnp.float32) if heights is None else heights
    opt_state = optimizer.init(heights)

    def body(carry, step_key):
        h, opt = carry
        h, opt, scalars = ot_step(h, opt, targets, step_key, optimizer=optimizer, mc_batch=mc_batch,
                                  mc_batches=mc_batches)
        return (h, opt), scalars

    (heights, _), history = jax.lax.scan(body, (heights, opt_state), jax.random.split(key, num_steps))
    return heights, history


# ------------------------------------------------------------------------------------------------ targets, time

def resolve_t_k(schedule, *, k: int, t_k: float = 0.0, reference_nfe: int = 20, spacing: str = "logSNR") -> float:
    """The targets' time: ``t_k`` when > 0, else the point of a ``reference_nfe``-step grid of ``spacing`` (from
    the schedule's start to its default end) that has k steps left, ``time_grid(...)[reference_nfe - k]``."""
    if t_k > 0:
        return float(t_k)
    from dpmjax.schedules import time_grid

    return float(time_grid(schedule, reference_nfe, spacing)[reference_nfe - k])


def make_targets(images, key, *, alpha_k: float, sigma_k: float):
    """y_i = alpha(t_k) x_i + sigma(t_k) z_i with z_i ~ N(0, I): the forward-noised images [n, ...] float32."""
    images = jnp.asarray(images, jnp.float32)
    noise = jax.random.normal(key, images.shape, jnp.float32)
    return alpha_k * images + sigma_k * noise


# ------------------------------------------------------------------------------------------------ sampling

def sample(apply_fn, variables, targets, heights, x_T, *, schedule, t_k: float, nfe: int, solver: str = "dpmpp_2m",
           spacing: str = "logSNR", prediction: str = "eps", key=None, **sampler_kwargs):
    """DPM-OT sampling: x_{t_k} = T(x_T) (the OT map of the prior noise), then ``solver`` from t_k to the end in
    ``nfe`` model calls (``dpmjax.samplers.sample`` with ``t_start=t_k``). Jittable; ``make_sampler`` jits it
    with variables, targets, heights, x_T and key as arguments.

    Args:
      apply_fn: ``apply_fn(variables, x, t)`` (``Teacher.apply_fn()`` / ``dpmjax.nn.make_apply_fn``).
      variables, targets [n, H, W, C], heights [n]: the network and the fitted OT (an ``OTState``'s fields).
      x_T: [B, H, W, C] N(0, I) noise.
      schedule, t_k: the teacher's schedule and the targets' time.
      nfe, solver, spacing, prediction, key, sampler_kwargs: those of ``dpmjax.samplers.sample`` (final_sigma,
        denoise_to_zero, solver options...).
    Returns:
      x_0 [B, H, W, C].
    """
    from dpmjax.samplers.driver import sample as solve

    x_t_k = ot_map(x_T, targets, heights)
    return solve(lambda x, t: apply_fn(variables, x, t), x_t_k, schedule=schedule, solver=solver, nfe=nfe,
                 t_start=t_k, spacing=spacing, prediction=prediction, key=key, **sampler_kwargs)


def make_sampler(apply_fn, *, schedule, t_k: float, nfe: int, solver: str = "dpmpp_2m", spacing: str = "logSNR",
                 prediction: str = "eps", **sampler_kwargs):
    """``fn(variables, targets, heights, x_T, key=None) -> x_0``: ``sample`` as one jitted program (a new state
    of the same shapes never recompiles). The settings are validated now (ValueError before any compile)."""
    from dpmjax.samplers.driver import plan

    check_sampling(schedule, t_k=t_k, nfe=nfe, solver=solver, spacing=spacing, **sampler_kwargs)
    chain = plan(schedule, solver, nfe=nfe, t_start=t_k, spacing=spacing, **sampler_kwargs)
    needs_key = chain.entry.needs_key(chain.options)

    @jax.jit
    def run(variables, targets, heights, x_T, key):
        return sample(apply_fn, variables, targets, heights, x_T, schedule=schedule, t_k=t_k, nfe=nfe, solver=solver,
                      spacing=spacing, prediction=prediction, key=key, **sampler_kwargs)

    def fn(variables, targets, heights, x_T, key=None):
        if key is None and needs_key:
            raise ValueError(f"solver {solver!r} is stochastic: pass key=jax.random.key(seed)")
        return run(variables, targets, heights, x_T, jax.random.key(0) if key is None else key)

    fn.cache_size = run._cache_size  # noqa: SLF001 - jax's public-by-use cache counter
    return fn


def check_sampling(schedule, *, t_k: float, nfe: int, solver: str, spacing: str, **sampler_kwargs) -> None:
    """ValueError naming the setting when the short chain cannot run: unknown solver, nfe below its minimum,
    a diffusers spacing (it ignores t_start), t_k outside the schedule's range."""
    from dpmjax.samplers.driver import plan
    from dpmjax.schedules import DISCRETE_SPACINGS, SPACINGS

    if spacing not in SPACINGS or spacing in DISCRETE_SPACINGS:
        raise ValueError(f"spacing must be one of {tuple(s for s in SPACINGS if s not in DISCRETE_SPACINGS)} (the "
                         f"chain starts at t_k; the diffusers spacings ignore t_start), got {spacing!r}")
    lo, hi = schedule.default_t_end, schedule.default_t_start
    if not isinstance(t_k, (int, float)) or isinstance(t_k, bool) or not lo < t_k <= hi:
        raise ValueError(f"t_k must lie in ({lo:g}, {hi:g}] (above the chain's end time), got {t_k!r}")
    plan(schedule, solver, nfe=nfe, t_start=t_k, spacing=spacing, **sampler_kwargs)


# ------------------------------------------------------------------------------------------------ the method

def _settings(config) -> dict:
    m = config.method
    return dict(num_targets=m.get("num_targets"), k=m.get("k"), solver=m.get("solver", "dpmpp_2m"),
                spacing=m.get("spacing", "logSNR"), t_k=m.get("t_k", 0.0), reference_nfe=m.get("reference_nfe", 20),
                mc_batch=m.get("mc_batch"), mc_batches=m.get("mc_batches", 1), lr_ot=m.get("lr_ot", 0.1))


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"config.method.{name} must be a positive integer, got {value!r}")
    return int(value)


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting, before anything is loaded or compiled."""
    if config.get("method") is None:
        raise ValueError("config.method is missing: use configs/methods/dpm_ot.py")
    s = _settings(config)
    for name in ("num_targets", "k", "mc_batch", "mc_batches"):
        _positive_int(name, s[name])
    if s["num_targets"] < 2:
        raise ValueError(f"config.method.num_targets must be >= 2 (one target is no transport), got {s['num_targets']}")
    lr = s["lr_ot"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"config.method.lr_ot must be a positive number, got {lr!r}")
    t_k = s["t_k"]
    if isinstance(t_k, bool) or not isinstance(t_k, (int, float)) or not np.isfinite(t_k) or t_k < 0:
        raise ValueError(f"config.method.t_k must be 0 (derived from k and reference_nfe) or a time in the "
                         f"schedule's range, got {t_k!r}")
    if t_k == 0:
        reference = _positive_int("reference_nfe", s["reference_nfe"])
        if reference <= s["k"]:
            raise ValueError(f"config.method.reference_nfe={reference} must exceed k={s['k']} (t_k is the point of "
                             f"a reference_nfe-step grid with k steps left), or set config.method.t_k")
    name, size = _dataset_size(config, teacher)  # reads the teacher's config only: works on an abstract one too
    if size < s["num_targets"]:
        raise ValueError(f"config.method.num_targets={s['num_targets']} exceeds the {size} training images of "
                         f"{name!r}")
    if teacher.num_classes:
        raise ValueError("dpm_ot maps noise to unconditional targets: the teacher is class-conditional "
                         f"(num_classes={teacher.num_classes}); use an unconditional teacher")
    from dpmjax.schedules import DISCRETE_SPACINGS, SPACINGS

    if s["spacing"] not in SPACINGS or s["spacing"] in DISCRETE_SPACINGS:
        raise ValueError(f"config.method.spacing must be one of "
                         f"{tuple(x for x in SPACINGS if x not in DISCRETE_SPACINGS)} (the chain starts at t_k; the "
                         f"diffusers spacings ignore t_start), got {s['spacing']!r}")
    try:
        t_resolved = resolve_t_k(teacher.schedule, k=s["k"], t_k=float(t_k), reference_nfe=s["reference_nfe"],
                                 spacing=s["spacing"])
        check_sampling(teacher.schedule, t_k=t_resolved, nfe=s["k"], solver=s["solver"], spacing=s["spacing"])
    except ValueError as err:
        raise ValueError(f"config.method (k={s['k']}, solver={s['solver']!r}, spacing={s['spacing']!r}, "
                         f"t_k={t_k}): {err}") from err


def _is_abstract(tree) -> bool:
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree))


def _training_source(config, teacher: Teacher):
    """(name, the train split) of the targets' dataset: config.data.name or the teacher's."""
    from dpmjax.data import get_dataset

    data = config.get("data") or {}
    name = data.get("name") or teacher.config.data.get("name")
    if not name:
        raise ValueError(f"the teacher ({teacher.workdir}) records no dataset (a converted checkpoint): set "
                         "config.data.name (and data.image_shape) to the images the targets are made from")
    kwargs = dict(data.get("kwargs") or teacher.config.data.get("kwargs") or {})
    return name, get_dataset(name, "train", **kwargs)


def _dataset_size(config, teacher: Teacher):
    name, source = _training_source(config, teacher)
    return name, len(source)


def _training_images(config, teacher: Teacher, num: int, seed: int) -> np.ndarray:
    """``num`` training images of the dataset (config.data.name or the teacher's), a seeded subset, [num, ...]."""
    name, source = _training_source(config, teacher)
    if len(source) < num:
        raise ValueError(f"config.method.num_targets={num} exceeds the {len(source)} training images of {name!r}")
    order = np.sort(np.random.default_rng(seed).permutation(len(source))[:num])
    return np.asarray(source.get_batch(order)["image"], np.float32)


def build(config, teacher: Teacher) -> Program:
    """The DPM-OT program: targets made in ``init`` from ``frozen["images"]``, one OT dual step per update.

    On an abstract teacher (``load_student``) the images are a ``jax.ShapeDtypeStruct`` of [num_targets, H, W, C]:
    the state's shapes depend only on the config.
    """
    s = _settings(config)
    schedule = teacher.schedule
    t_k = resolve_t_k(schedule, k=s["k"], t_k=float(s["t_k"]), reference_nfe=s["reference_nfe"], spacing=s["spacing"])
    alpha_k, sigma_k = (float(v) for v in np.exp(np.asarray(
        [schedule.log_alpha(np.float64(t_k)), schedule.log_sigma(np.float64(t_k))], np.float64)))
    n = int(s["num_targets"])
    image_shape = teacher.image_shape
    if _is_abstract(teacher.params):
        images = jax.ShapeDtypeStruct((n,) + image_shape, jnp.float32)
    else:
        images = _training_images(config, teacher, n, int(config.get("seed", 0)))
    optimizer = ot_optimizer(float(s["lr_ot"]))
    mc_batch, mc_batches = int(s["mc_batch"]), int(s["mc_batches"])

    def init(frozen, key):
        heights = jnp.zeros((n,), jnp.float32)
        return OTState(variables=frozen["variables"],
                       targets=make_targets(frozen["images"], key, alpha_k=alpha_k, sigma_k=sigma_k),
                       heights=heights, opt_state=optimizer.init(heights))

    def update(state: OTState, batch, frozen, key):
        del batch, frozen  # the targets live in the state; no real batch is read
        heights, opt_state, scalars = ot_step(state.heights, state.opt_state, state.targets, key,
                                              optimizer=optimizer, mc_batch=mc_batch, mc_batches=mc_batches)
        return state.replace(heights=heights, opt_state=opt_state), scalars

    def student(state: OTState, use_ema: bool = True):
        del use_ema  # the network is the teacher's, unchanged
        return state.variables

    output = {"method": {"t_k": t_k},  # the resolved time: the workdir says where its targets are
              "sample": {"solver": s["solver"], "nfe": int(s["k"]), "spacing": s["spacing"]}}
    return Program(init=init, update=update, frozen={"variables": teacher.params, "images": images},
                   student=student, metric_names=("grad_norm", "empty_cells", "max_mass_ratio"), output=output,
                   needs_data=False)


METHOD = Method(name="dpm_ot", build=build, validate=validate,
                doc="DPM-OT (Li et al. ICCV 2023): semi-discrete OT map from the prior noise to noised training "
                    "images at t_k, then k solver steps",
                sample_workdir=lambda *args, **kwargs: sample_workdir(*args, **kwargs))


# ------------------------------------------------------------------------------------------------ workdirs

def load_workdir(workdir: str, *, step: int | None = None):
    """(model, OTState, schedule, config) of a finished dpm_ot workdir: its program is built on an abstract teacher
    (shapes only, from ``config.teacher``) and the checkpoint restored (as ``dpmjax.methods.load_student``, which
    returns the network variables alone)."""
    from dpmjax.methods.loop import restore_method_state
    from dpmjax.train.resume import read_workdir_config

    config = read_workdir_config(workdir)
    if config.get("method") is None or config.method.get("name") != "dpm_ot":
        raise ValueError(f"{workdir} is not a dpm_ot workdir (its config.method is "
                         f"{config.get('method') and config.method.get('name')!r})")
    _, teacher, state = restore_method_state(config, workdir, step=step)
    return teacher.model, state, teacher.schedule, config


def sample_workdir(workdir: str, num: int, *, seed: int = 0, step: int | None = None, solver: str | None = None,
                   nfe: int | None = None, spacing: str | None = None, batch_size: int = 500, **sampler_kwargs):
    """``num`` DPM-OT samples of a dpm_ot workdir, float32 numpy [num, H, W, C]: x_T ~ N(0, I) from
    ``jax.random.key(seed)``, the fitted OT map, then the workdir's ``sample`` solver / nfe (= k) / spacing from
    its t_k unless given. The function ``dpmjax sample`` calls for a workdir whose ``config.method.name`` is
    "dpm_ot" (the plain sampler from pure noise would ignore the map)."""
    from dpmjax.nn import make_apply_fn

    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    model, state, schedule, config = load_workdir(workdir, step=step)
    settings = dict(solver=solver or config.sample.solver, nfe=nfe or int(config.sample.nfe),
                    spacing=spacing or config.sample.spacing)
    fn = make_sampler(make_apply_fn(model, schedule), schedule=schedule, t_k=float(config.method.t_k),
                      prediction=str(config.train.get("target", "eps")), **settings, **sampler_kwargs)
    key = jax.random.key(seed)
    shape = tuple(state.targets.shape[1:])
    batch_size = min(batch_size, int(num))
    out = []
    for c, start in enumerate(range(0, num, batch_size)):
        size = min(batch_size, num - start)
        noise_key, solver_key = jax.random.split(jax.random.fold_in(key, c))
        x_T = jax.random.normal(noise_key, (batch_size,) + shape, jnp.float32)  # one batch shape: one compile
        x = fn(state.variables, state.targets, state.heights, x_T, solver_key)
        out.append(np.asarray(x)[:size])
    return np.concatenate(out)

