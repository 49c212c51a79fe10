"""SpeedUpNet (SUN): classifier-free guidance folded into one pass by a negative-branch adapter in every
cross-attention layer, trained by multi-step consistency (MSC) distillation from the guided teacher.

    dpmjax finetune --method speedupnet --teacher runs/digits_xattn --workdir runs/digits_sun \
        --config configs/methods/speedupnet.py
    dpmjax sample --workdir runs/digits_sun --labels 3     # 4 DDIM steps, one pass each, no CFG

Chai et al., "SpeedUpNet: A Plug-and-Play Adapter Network for Accelerating Text-to-Image Diffusion Models"
(arXiv 2312.08887; docs: /work/shared/reference/finetune-methods.md, section 7). The teacher is a class- or
token-conditioned UNet whose condition enters through cross-attention (``model.label_tokens``: the label is a
learned token sequence, as a prompt's text-encoder output is for Stable Diffusion). Its guided prediction
costs two passes per step:

    f_cfg(x, t, c) = f(x, t, c_neg) + w (f(x, t, c) - f(x, t, c_neg))           (Ho & Salimans 2022, eq. 6)

SUN adds to each cross-attention block the adapter of ``dpmjax.nn.layers.CrossAttentionBlock``
(``model.negative_adapter``): the negative sequence c_neg (the null class) through its own k_neg / v_neg with the
block's queries, rescaled to the positive branch's norm, a per-channel affine (alpha, beta), subtracted before
the output projection (their Sec. 3.2). The base network is frozen; only the adapter is trained, so the
same adapter can be plugged into another finetune of the same base (``plug``; their "universality").

MSC loss (their Sec. 3.3). The student runs K steps of DDIM on the grid t_0 > ... > t_K (``student_steps``, the
teacher's sampling spacing); the teacher runs the guided ODE with ``teacher_substeps`` = M steps of
``teacher_solver`` inside every student interval (M substeps uniform in log-SNR), giving its trajectory points
X_k at the student's grid times from the same x_T. Each update starts the student at a teacher point X_k, k
uniform in {0, ..., K - m}, runs m = ``msc_steps`` consecutive student steps, and matches all m of them:

    L(phi) = 1/m sum_{j=1..m} || x^phi_{t_{k+j}} - X_{k+j} ||^2,   x^phi_{t_k} = X_k,
    x^phi_{t_{j+1}} = alpha_{j+1} x0_phi + sigma_{j+1} (x^phi_{t_j} - alpha_j x0_phi) / sigma_j     (DDIM)

with x0_phi the student's x0-prediction (one pass, no guidance). m = 1 is plain step-wise trajectory distillation;
m > 1 makes consecutive student steps consistent with the teacher's trajectory, which is what the paper says
stabilises the learned offset over a short chain. The paper's exact weighting is not public (no training code
was released); this is our reading, written down here.

Choices (overridable in ``config.method``): the adapter's k_neg / v_neg start as copies of the block's k / v
(``init="copy"``; "random" keeps the module's init) and alpha = beta = 0, so update 0 is the conditional teacher;
labels are uniform over the classes; x_T ~ N(0, I) fresh every update (no data is read).

config.method: guidance_scale (w; None = the teacher's ``sample.guidance_scale``, must be > 1), student_steps (K),
teacher_substeps (M), teacher_solver, msc_steps (m, 1..K), spacing (None = the teacher's), init.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.methods import adaptation
from dpmjax.methods.base import Method, Teacher, method_settings
from dpmjax.nn import build_model, make_apply_fn, make_cfg_apply_fn
from dpmjax.parameterization import to_x0
from dpmjax.samplers import SOLVERS
from dpmjax.samplers.base import at_time
from dpmjax.samplers.driver import plan, sample

__all__ = ["METHOD", "DEFAULTS", "settings", "validate", "build", "student_model_config", "adapter_paths",
           "adapter_of", "init_adapter", "plug", "student_timesteps", "teacher_timesteps", "ddim_step", "msc_loss",
           "STUDENT_SOLVER"]

DEFAULTS = dict(guidance_scale=None, student_steps=4, teacher_substeps=5, teacher_solver="dpmpp_2m", msc_steps=2,
                spacing=None, init="copy")
INITS = ("copy", "random")
STUDENT_SOLVER = "ddim"  # the rollout the loss trains is DDIM's: the output workdir samples with it
ADAPTER_LEAVES = ("k_neg", "v_neg", "neg_alpha", "neg_beta")


def settings(config, teacher: Teacher) -> dict:
    """The method settings with the teacher's guidance scale and spacing filled in where None."""
    s = method_settings(config, DEFAULTS)
    sample_section = teacher.config.get("sample") or {}
    if s["guidance_scale"] is None:
        s["guidance_scale"] = float(sample_section.get("guidance_scale", 1.0))
    if s["spacing"] is None:
        s["spacing"] = str(sample_section.get("spacing", "logSNR"))
    return s


def student_model_config(teacher: Teacher) -> dict:
    """The teacher's model section with the adapter switched on."""
    model = teacher.config.model
    return dict(model.to_dict() if hasattr(model, "to_dict") else model, negative_adapter=True)


def adapter_paths(params) -> list:
    """Flattened paths (tuples) of the adapter's leaves in a student's params tree."""
    return [path for path in flax.traverse_util.flatten_dict(params) if path[-2] in ADAPTER_LEAVES
            or path[-1] in ADAPTER_LEAVES]


def adapter_of(variables) -> dict:
    """The adapter of an adapted network: its params tree cut to the adapter's leaves (what ``plug`` takes)."""
    flat = flax.traverse_util.flatten_dict(_params(variables))
    return flax.traverse_util.unflatten_dict({path: flat[path] for path in adapter_paths(_params(variables))})


def init_adapter(teacher_params, student_params, *, copy: bool = True) -> dict:
    """The adapter at the start of training: ``adapter_of`` a fresh init of the adapted model, with k_neg / v_neg
    copied from the block's k / v when ``copy``; alpha and beta are the module's zeros."""
    adapter = flax.traverse_util.flatten_dict(adapter_of(student_params))
    if copy:
        teacher_flat = flax.traverse_util.flatten_dict(_params(teacher_params))
        for path in adapter:
            if path[-2] in ("k_neg", "v_neg"):
                adapter[path] = teacher_flat[path[:-2] + (path[-2][0],) + path[-1:]]
    return flax.traverse_util.unflatten_dict({path: jnp.asarray(v) for path, v in adapter.items()})


def plug(base_params, adapter: dict) -> dict:
    """Variables {"params": ...} of the adapted network: ``base_params`` (the teacher, or any finetune of the same
    base architecture) with the adapter's leaves added. No training: SUN's plug-and-play transfer."""
    flat = dict(flax.traverse_util.flatten_dict(_params(base_params)))
    for path, value in flax.traverse_util.flatten_dict(_params(adapter)).items():
        if path in flat:
            raise ValueError(f"the base network already has {'/'.join(path)}: plug the adapter into a network "
                             "without one")
        block = path[:-2] if path[-2] in ("k_neg", "v_neg") else path[:-1]
        if block + ("k", "kernel") not in flat:
            raise ValueError(f"the base network has no cross-attention block {'/'.join(block)}: the adapter was "
                             "trained for another architecture")
        flat[path] = value
    return {"params": flax.traverse_util.unflatten_dict(flat)}


def _params(variables):
    return variables["params"] if isinstance(variables, dict) and "params" in variables else variables


def student_timesteps(schedule, s: dict) -> np.ndarray:
    """The student's grid t_0 > ... > t_K: ``STUDENT_SOLVER`` at K NFE on the spacing, as ``dpmjax sample`` of the
    output workdir builds it."""
    return np.asarray(plan(schedule, STUDENT_SOLVER, nfe=int(s["student_steps"]), spacing=s["spacing"]).grid["t"],
                      np.float64)


def teacher_timesteps(schedule, s: dict) -> np.ndarray:
    """The teacher's grid of K M steps: every student interval split in M pieces uniform in log-SNR lambda; entry
    k M is the student's t_k exactly."""
    times = student_timesteps(schedule, s)
    m = int(s["teacher_substeps"])
    lam = np.asarray(schedule.lambda_(jnp.asarray(times, jnp.float32)), np.float64)
    grid = [times[0]]
    for k in range(len(times) - 1):
        inner = np.linspace(lam[k], lam[k + 1], m + 1)[1:-1]
        grid.extend(np.asarray(schedule.t_of_lambda(jnp.asarray(inner, jnp.float32)), np.float64).tolist())
        grid.append(times[k + 1])
    return np.asarray(grid, np.float64)


def _positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"config.method.{name} must be an integer >= {minimum}, got {value!r}")


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting, before anything is restored or compiled: a teacher without cross-attention
    (the adapter has nowhere to go), an unconditional teacher, a guidance scale <= 1, bad step counts."""
    given = method_settings(config, DEFAULTS)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown speedupnet settings {unknown}; known: {sorted(DEFAULTS)}")
    model = teacher.config.model
    if model.get("kind") != "unet" or model.get("context_dim") is None \
            or not (model.get("attention_resolutions") or model.get("mid_attention", True)):
        raise ValueError("speedupnet puts its adapter into cross-attention layers: the teacher must be a UNet with "
                         "cross-attention (model.context_dim and model.attention_resolutions or mid_attention); this "
                         f"one is a {model.get('kind')!r} with context_dim={model.get('context_dim')}")
    if model.get("negative_adapter"):
        raise ValueError("the teacher already has a SpeedUpNet adapter (model.negative_adapter): distil from the "
                         "base model")
    if teacher.num_classes is None or not model.get("label_tokens"):
        raise ValueError("speedupnet distils a conditional teacher whose label is its cross-attention sequence "
                         "(model.num_classes and model.label_tokens > 0): the negative branch reads the null class")
    s = settings(config, teacher)
    w = s["guidance_scale"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w <= 1.0:
        raise ValueError(f"config.method.guidance_scale must be a number > 1 (the teacher's CFG scale to fold in), "
                         f"got {w!r}")
    for name in ("student_steps", "teacher_substeps", "msc_steps"):
        _positive_int(s[name], name)
    if s["msc_steps"] > s["student_steps"]:
        raise ValueError(f"config.method.msc_steps ({s['msc_steps']}) must be at most student_steps "
                         f"({s['student_steps']})")
    if s["init"] not in INITS:
        raise ValueError(f"config.method.init must be one of {INITS}, got {s['init']!r}")
    solver = s["teacher_solver"]
    if solver not in SOLVERS:
        raise ValueError(f"config.method.teacher_solver must be a registered solver, got {solver!r}")
    entry = SOLVERS[solver]
    if entry.adaptive or entry.needs_key({}) or entry.prepare is not None:
        raise ValueError(f"config.method.teacher_solver {solver!r} is adaptive, stochastic or needs grid data: the "
                         "teacher trajectory needs a deterministic fixed-step ODE solver (ddim, dpmpp_2m, unipc, ...)")
    try:
        plan(teacher.schedule, solver, timesteps=teacher_timesteps(teacher.schedule, s))
    except ValueError as err:
        raise ValueError(f"config.method: the student grid (student_steps={s['student_steps']}, spacing "
                         f"{s['spacing']!r}) or the teacher's {solver} on it does not work: {err}") from None


def ddim_step(x0, x, c_from, c_to):
    """x_{t_to} = alpha_to x0 + sigma_to (x - alpha_from x0) / sigma_from: DDIM (= DPM-Solver-1) written with the
    x0-prediction; ``c_from`` / ``c_to`` the schedule's ``at_time`` coefficients."""
    eps = (x - c_from.alpha * x0) / c_from.sigma
    return c_to.alpha * x0 + c_to.sigma * eps


def msc_loss(student_apply, params, points, labels, times, start, num_steps: int, *, schedule, prediction: str):
    """The MSC loss (module docstring): the student from ``points[start]`` over ``num_steps`` DDIM steps of
    ``times`` against ``points[start + 1 : start + 1 + num_steps]``.

    Args:
      student_apply: ``apply(params, x, t, y=...)``; points: [K + 1, B, ...] the teacher's x at the student grid
        (x_T first); times: [K + 1] float32; start: a traced int in [0, K - num_steps].
    Returns:
      (loss, per-step MSE [num_steps]).
    """
    x = jax.lax.dynamic_index_in_dim(points, start, keepdims=False)
    errors = []
    for j in range(num_steps):
        t_from = jax.lax.dynamic_index_in_dim(times, start + j, keepdims=False)
        t_to = jax.lax.dynamic_index_in_dim(times, start + j + 1, keepdims=False)
        out = student_apply(params, x, jnp.broadcast_to(t_from, (x.shape[0],)), y=labels).astype(x.dtype)
        x0 = to_x0(out, x, t_from, schedule, prediction)
        x = ddim_step(x0, x, at_time(schedule, t_from), at_time(schedule, t_to))
        target = jax.lax.dynamic_index_in_dim(points, start + j + 1, keepdims=False)
        errors.append(jnp.mean(jnp.square(x - target)))
    errors = jnp.stack(errors)
    return jnp.mean(errors), errors


def build(config, teacher: Teacher):
    """Trainable: the adapter (flat dict of its leaves); frozen: the teacher; the student: ``plug`` of the two."""
    s = settings(config, teacher)
    schedule, prediction = teacher.schedule, teacher.prediction
    student_model = build_model(student_model_config(teacher))
    student_apply = make_apply_fn(student_model, schedule)
    teacher_cfg = make_cfg_apply_fn(teacher.model, schedule, float(s["guidance_scale"]))
    times_student = student_timesteps(schedule, s)
    times_teacher = teacher_timesteps(schedule, s)
    substeps, num_steps = int(s["teacher_substeps"]), int(s["msc_steps"])
    last_start = len(times_student) - 1 - num_steps
    batch, classes = int(config.data.batch_size), int(teacher.num_classes)
    shape = teacher.image_shape
    solver = s["teacher_solver"]

    def init(frozen, key):
        from dpmjax.nn import init_params

        fresh = init_params(student_model, shape, int(config.seed))
        return init_adapter(frozen["teacher"], fresh, copy=s["init"] == "copy")

    def teacher_points(teacher_params, x_T, labels):
        """[K + 1, B, ...]: x_T and the guided teacher's trajectory at the student's grid times."""
        _, trajectory = sample(lambda x, t: teacher_cfg(teacher_params, x, t, labels), x_T, schedule=schedule,
                               solver=solver, timesteps=times_teacher, prediction=prediction, return_trajectory=True)
        picked = trajectory[substeps - 1::substeps]  # entry j is the state at grid time j + 1
        return jax.lax.stop_gradient(jnp.concatenate([x_T[None], picked], axis=0))

    def loss(adapter, frozen, batch_data, key):
        noise_key, label_key, start_key = jax.random.split(key, 3)
        x_T = jax.random.normal(noise_key, (batch,) + shape, jnp.float32)
        labels = jax.random.randint(label_key, (batch,), 0, classes)
        points = teacher_points(frozen["teacher"], x_T, labels)
        start = jax.random.randint(start_key, (), 0, last_start + 1)
        value, errors = msc_loss(student_apply, plug(frozen["teacher"], adapter), points, labels,
                                 jnp.asarray(times_student, jnp.float32), start, num_steps, schedule=schedule,
                                 prediction=prediction)
        return value, {"first_step_mse": errors[0], "last_step_mse": errors[-1]}

    output = {"model": {"negative_adapter": True},
              "sample": {"solver": STUDENT_SOLVER, "nfe": int(s["student_steps"]), "spacing": s["spacing"],
                         "guidance_scale": 1.0}}
    return adaptation.student_program(config, teacher, init=init, loss=loss,
                                      student=lambda adapter, frozen: plug(frozen["teacher"], adapter),
                                      frozen={"teacher": teacher.params}, student_reads_frozen=True,
                                      metric_names=("first_step_mse", "last_step_mse"), output=output,
                                      needs_data=False)


METHOD = Method(name="speedupnet", build=build, validate=validate,
                doc="SpeedUpNet: a negative-branch cross-attention adapter folds CFG into one pass, trained by "
                    "multi-step consistency distillation (4 steps, no guidance)")
