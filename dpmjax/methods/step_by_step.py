"""Distilling step-by-step for diffusion: a one-step (or k-step) trajectory-distilled student with an auxiliary
"rationale" head that predicts the teacher's intermediate trajectory states, dropped at inference.

Two papers combined (docs: /work/shared/reference/finetune-methods.md, section 14):

* Knowledge distillation in iterative generative models (Luhman & Luhman 2021): draw N noises x_T^(i), run the
  teacher's deterministic ODE sampler once on each to get x_0^(i) = S_teacher(x_T^(i)), and train a student
  that maps x_T to x_0 in k network calls by regression on the fixed set of N pairs (their eq. 4 for k = 1):

      L_main(theta) = E_i || G_theta(x_T^(i)) - x_0^(i) ||^2                 (mean over pixels)

* Distilling step-by-step (Hsieh et al. 2023): train the small model on the teacher's side information (the
  rationale) as an auxiliary output, unused at inference, with

      L = alpha L_main + (1 - alpha) L_rationale                            (their eq. 3, ``TaskPrefixTrainer``)

  Here the rationale is K intermediate states of the same teacher trajectory,

      L_rationale(theta) = E_i 1/K sum_k || R_theta,k(x_T^(i)) - x_{t_{j_k + 1}}^(i) ||^2

  with the trajectory entries j_k = floor((k + 1) N_T / (K + 1)) - 1, k = 0 .. K-1 (``rationale_indices``) of the
  teacher's N_T-NFE run (entry j is the solver's state after model call j, i.e. at grid time t_{j+1}).
  ``rationale="denoised"`` replaces each state by the teacher's x0-prediction there,
  x0_teacher(x_{t_{j_k + 1}}, t_{j_k + 1}) (K more teacher calls per pair): a clean image instead of a noisy one.

The student network is the teacher's UNet (dpmjax's, or the converted diffusers UNet2DModel) with
``out_channels = C (1 + K)``: channels [:C] are the main output, in
the *teacher's* parameterization (eps / x0 / v: so the student starts as the teacher), converted to x0 as every
sampler does; channels [C + k C : C + (k + 1) C] are the raw prediction R_k of rationale state k. The widened
``conv_out`` is the teacher's for the first C channels and zero for the head (a zero head outputs 0 at init and
leaves the main output unchanged). ``program.student`` slices ``conv_out`` back to C channels: the output workdir
holds a teacher-shaped network, its model config is the teacher's and ``dpmjax sample`` runs it.

The student's sampler is the registry's ``renoise`` solver with ``student_steps`` NFE on the ``student_spacing``
grid t_0 > ... > t_k (``dpmjax.samplers.renoise``): for k = 1 (the default, Luhman & Luhman) the output is the
x0-prediction at (x_T, t_0 = schedule start); for k > 1 each x0-prediction is re-noised with fresh noise
z_i = normal(fold_in(key, i)) to t_{i+1}. Training runs exactly that rollout (``student_rollout``, the same
noise draws); the rationale head is read at the first call (x_T, t_0) only.

Choices where the papers are silent (written down, overridable in the config):
  * pairs: x_T^(i) = normal(fold_in(key(pair_seed), i)): the first n pairs of a pool of N are the same for
    every N, so ``num_pairs`` = 10 %, 25 %, 100 % of a pool gives nested data sets; the teacher (its params in
    ``frozen``) makes them once inside ``init`` (jitted, in chunks of ``generate_batch``) and they live in the
    state (``noise``, ``targets``: checkpointed, so a resume does not regenerate them);
  * each update draws ``data.batch_size`` pairs uniformly with replacement;
  * ``aux=False`` is the ablation: no head (K = 0, the student has the teacher's shape), alpha = 1 (``alpha``
    and ``rationale_states`` are then ignored);
  * the teacher is unconditional, a UNet (``conv_out`` is its output layer), sampled by a deterministic
    fixed-step solver without grid preparation (ddim, dpmpp_2m, unipc, ...).
  An eps-predicting teacher makes the one-step x0 = (x_T - sigma_0 eps) / alpha_0 ill-conditioned at t_0 = 1
  (alpha_0 ~ 6e-3 on the linear VP schedule): prefer v or x0 teachers (the digits teacher predicts v).

config.method: num_pairs, pair_seed, teacher_solver, teacher_nfe, spacing (the teacher's grid), student_steps,
student_spacing, rationale_states (K), rationale ("states" or "denoised"), alpha, aux (bool), generate_batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dpmjax.methods.base import Method, Program, Teacher, method_settings
from dpmjax.nn import build_model, make_apply_fn
from dpmjax.parameterization import to_x0
from dpmjax.samplers import SOLVERS
from dpmjax.samplers.base import at_time, combine
from dpmjax.samplers.driver import plan, sample
from dpmjax.train import optim
from dpmjax.train.state import ema_decay_at, ema_update

__all__ = ["METHOD", "StepByStepState", "build", "validate", "rationale_indices", "widen_output", "slice_output",
           "student_rollout", "distillation_loss", "generate_pairs", "teacher_timesteps", "student_timesteps",
           "STUDENT_SOLVER"]

DEFAULTS = dict(num_pairs=2000, pair_seed=0, teacher_solver="dpmpp_2m", teacher_nfe=10, spacing="karras",
                student_steps=1, student_spacing="time_uniform", rationale_states=3, alpha=0.5, aux=True,
                rationale="states", generate_batch=250)
RATIONALES = ("states", "denoised")
STUDENT_SOLVER = "renoise"  # the sampler the output workdir's sample section names
# model kinds with a final ``conv_out`` of ``out_channels`` outputs: dpmjax's UNet and the diffusers port
WIDENABLE_KINDS = ("unet", "diffusers_unet")


@struct.dataclass
class StepByStepState:
    step: jax.Array      # [] int32: updates done (the EMA warm-up)
    params: object       # the widened student {"params": ...}: conv_out has C (1 + K) output channels
    ema_params: object   # its EMA (``train.ema_decay``; 0 keeps the latest params)
    opt_state: object
    noise: jax.Array     # [N, H, W, C] float32: x_T of the N distillation pairs
    targets: jax.Array   # [N, 1 + K, H, W, C] float32: the teacher's x_0, then its K rationale states


def _settings(config) -> dict:
    return method_settings(config, DEFAULTS)


def _num_states(m: dict) -> int:
    """K: rationale states predicted by the head (0 without the auxiliary targets)."""
    return int(m["rationale_states"]) if m["aux"] else 0


def _alpha(m: dict) -> float:
    return float(m["alpha"]) if m["aux"] else 1.0


def rationale_indices(num_calls: int, num_states: int) -> np.ndarray:
    """Trajectory entries j_k = floor((k + 1) num_calls / (K + 1)) - 1, k = 0 .. K-1: K states spread evenly
    over the teacher's run, strictly increasing and before the last entry (x_0 itself) when K < num_calls."""
    k = np.arange(num_states)
    return ((k + 1) * num_calls) // (num_states + 1) - 1


def teacher_timesteps(config, teacher: Teacher) -> np.ndarray:
    """The teacher's grid t_0 > ... > t_{N_T} (float64) for the pair-generating run."""
    m = _settings(config)
    return np.asarray(plan(teacher.schedule, m["teacher_solver"], nfe=int(m["teacher_nfe"]),
                           spacing=m["spacing"]).grid["t"], np.float64)


def student_timesteps(config, teacher: Teacher) -> np.ndarray:
    """The student's ``renoise`` grid t_0 > ... > t_k (float64): what ``dpmjax sample`` of the output builds."""
    m = _settings(config)
    return np.asarray(plan(teacher.schedule, STUDENT_SOLVER, nfe=int(m["student_steps"]),
                           spacing=m["student_spacing"]).grid["t"], np.float64)


def _positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"config.method.{name} must be an integer >= {minimum}, got {value!r}")


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting, before anything is compiled."""
    m = _settings(config)
    unknown = sorted(set(m) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown step_by_step settings {unknown}; known: {sorted(DEFAULTS)}")
    for name in ("num_pairs", "teacher_nfe", "student_steps", "generate_batch"):
        _positive_int(m[name], name)
    _positive_int(m["pair_seed"], "pair_seed", minimum=0)
    if not isinstance(m["aux"], bool):
        raise ValueError(f"config.method.aux must be True or False, got {m['aux']!r}")
    solver = m["teacher_solver"]
    if solver not in SOLVERS:
        raise ValueError(f"config.method.teacher_solver must be a registered solver, got {solver!r}; choose one "
                         f"of {sorted(SOLVERS)}")
    entry = SOLVERS[solver]
    if entry.adaptive or entry.needs_key({}) or entry.prepare is not None:
        raise ValueError(f"config.method.teacher_solver {solver!r} is adaptive, stochastic or needs grid data: "
                         "the pairs need a deterministic fixed-step ODE solver (ddim, dpmpp_2m, unipc, ...)")
    try:
        teacher_timesteps(config, teacher)
    except ValueError as err:
        raise ValueError(f"config.method: the teacher's {solver} cannot run teacher_nfe={m['teacher_nfe']} with "
                         f"spacing {m['spacing']!r}: {err}") from None
    try:
        student_timesteps(config, teacher)
    except ValueError as err:
        raise ValueError(f"config.method: the student's {STUDENT_SOLVER} sampler cannot run student_steps="
                         f"{m['student_steps']} with student_spacing {m['student_spacing']!r}: {err}") from None
    if m["rationale"] not in RATIONALES:
        raise ValueError(f"config.method.rationale must be one of {RATIONALES}, got {m['rationale']!r}")
    if m["aux"]:
        _positive_int(m["rationale_states"], "rationale_states")
        if m["rationale_states"] >= m["teacher_nfe"]:
            raise ValueError(f"config.method.rationale_states (K={m['rationale_states']}) must be below teacher_nfe "
                             f"({m['teacher_nfe']}): the K states are distinct intermediate entries of its run")
        alpha = m["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"config.method.alpha must be a number in (0, 1] (the weight of the main loss), "
                             f"got {alpha!r}")
    if teacher.config.model.get("kind") not in WIDENABLE_KINDS:
        raise ValueError(f"step_by_step widens a UNet's conv_out (model kinds {WIDENABLE_KINDS}); the teacher's "
                         f"model is {teacher.config.model.get('kind')!r}")
    if teacher.num_classes is not None:
        raise ValueError("step_by_step distils unconditional teachers; this one is class-conditional "
                         f"(num_classes={teacher.num_classes})")
    _positive_int(config.data.batch_size, "batch_size (config.data)")


def widen_output(variables, num_states: int):
    """The teacher's variables with ``conv_out`` widened from C to C (1 + K) output channels: the first C are
    the teacher's kernel and bias, the K C head channels are zero (so the head outputs 0 at init)."""
    params = dict(variables["params"])
    conv = params["conv_out"]
    kernel, bias = conv["kernel"], conv["bias"]
    channels = kernel.shape[-1]
    params["conv_out"] = dict(conv, kernel=jnp.concatenate(
        [kernel, jnp.zeros(kernel.shape[:-1] + (channels * num_states,), kernel.dtype)], axis=-1),
        bias=jnp.concatenate([bias, jnp.zeros((channels * num_states,), bias.dtype)]))
    return dict(variables, params=params)


def slice_output(variables, channels: int):
    """The inverse of ``widen_output``: ``conv_out`` cut to its first ``channels`` outputs (the head dropped)."""
    params = dict(variables["params"])
    conv = params["conv_out"]
    params["conv_out"] = dict(conv, kernel=conv["kernel"][..., :channels], bias=conv["bias"][:channels])
    return dict(variables, params=params)


def student_rollout(apply_fn, params, x_T, times, key, *, schedule, prediction: str, channels: int):
    """The student's ``renoise`` sampling, written out, and its rationale at the first call.

        out_i  = G_theta(x_{t_i}, t_i)                       [B, H, W, C (1 + K)]     i = 0 .. k-1
        x0_i   = to_x0(out_i[..., :C], x_{t_i}, t_i)         (the teacher's parameterization)
        x_{t_{i+1}} = alpha_{t_{i+1}} x0_i + sigma_{t_{i+1}} z_i,  z_i = normal(fold_in(key, i))
        R      = out_0[..., C:] as [B, K, H, W, C]

    Args:
      apply_fn: ``apply_fn(params, x, t)`` of the widened network; times: [k + 1] float32 grid; key: the
        re-noising key (unused for k = 1).
    Returns:
      (x0_{k-1} [B, H, W, C], R [B, K, H, W, C]).
    """
    x, rationale, x0 = x_T, None, None
    num_steps = times.shape[0] - 1
    for i in range(num_steps):
        t = jnp.asarray(times[i], jnp.float32)
        out = apply_fn(params, x, jnp.broadcast_to(t, (x.shape[0],))).astype(x.dtype)
        if i == 0:
            head = out[..., channels:]
            rationale = jnp.moveaxis(head.reshape(head.shape[:-1] + (-1, channels)), -2, 1)
        x0 = to_x0(out[..., :channels], x, t, schedule, prediction)
        if i + 1 < num_steps:
            c = at_time(schedule, jnp.asarray(times[i + 1], jnp.float32))
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            x = combine([x0, z], [c.alpha, c.sigma])
    return x0, rationale


def distillation_loss(apply_fn, params, x_T, targets, times, key, *, schedule, prediction, channels, alpha):
    """L = alpha L_main + (1 - alpha) L_rationale (module docstring); returns (L, (L_main, L_rationale)).

    ``targets`` [B, 1 + K, H, W, C]: the teacher's x_0, then its K states; L_rationale = 0 for K = 0."""
    x0, rationale = student_rollout(apply_fn, params, x_T, times, key, schedule=schedule, prediction=prediction,
                                    channels=channels)
    main = jnp.mean(jnp.square(x0 - targets[:, 0]))
    if targets.shape[1] > 1:
        side = jnp.mean(jnp.square(rationale - targets[:, 1:]))
    else:
        side = jnp.zeros((), main.dtype)
    return alpha * main + (1.0 - alpha) * side, (main, side)


def generate_pairs(apply_fn, teacher_params, x_T, *, schedule, prediction, solver, timesteps, indices,
                   batch_size, denoised: bool = False):
    """The teacher's targets for noises x_T [N, H, W, C]: [N, 1 + K, H, W, C] = (x_0, trajectory[indices]),
    in chunks of ``batch_size`` (``lax.map``; the last chunk padded). ``denoised``: each state x_{t_{j+1}}
    replaced by the teacher's x0-prediction at (x_{t_{j+1}}, t_{j+1})."""
    state_times = np.asarray(timesteps, np.float32)[np.asarray(indices, np.int64) + 1]
    num = x_T.shape[0]
    chunks = -(-num // batch_size)
    padded = jnp.concatenate([x_T, jnp.zeros((chunks * batch_size - num,) + x_T.shape[1:], x_T.dtype)])

    def one_chunk(x):
        x0, trajectory = sample(lambda x, t: apply_fn(teacher_params, x, t), x, schedule=schedule, solver=solver,
                                timesteps=timesteps, prediction=prediction, return_trajectory=True)
        states = [trajectory[j] for j in indices]
        if denoised:
            states = [to_x0(apply_fn(teacher_params, s, jnp.full((s.shape[0],), t, jnp.float32)), s,
                            jnp.float32(t), schedule, prediction) for s, t in zip(states, state_times)]
        return jnp.stack([x0] + states, axis=1)

    out = jax.lax.map(one_chunk, padded.reshape((chunks, batch_size) + x_T.shape[1:]))
    return out.reshape((chunks * batch_size,) + out.shape[2:])[:num]


def pair_noise(pair_seed: int, num_pairs: int, image_shape) -> jax.Array:
    """x_T^(i) = normal(fold_in(key(pair_seed), i)) [N, H, W, C]: pair i does not depend on N."""
    base = jax.random.key(pair_seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), tuple(image_shape)))(
        jnp.arange(num_pairs))


def build(config, teacher: Teacher) -> Program:
    """The program: init widens the teacher and makes the pairs, update is one regression step on a minibatch."""
    m = _settings(config)
    num_states, alpha = _num_states(m), _alpha(m)
    shape = teacher.image_shape
    channels = shape[-1]
    student_model = build_model(dict(teacher.config.model.to_dict() if hasattr(teacher.config.model, "to_dict")
                                     else teacher.config.model, out_channels=channels * (1 + num_states)))
    student_apply = make_apply_fn(student_model, teacher.schedule)
    teacher_apply = teacher.apply_fn()
    schedule, prediction = teacher.schedule, teacher.prediction
    times_teacher = teacher_timesteps(config, teacher)
    times_student = student_timesteps(config, teacher).astype(np.float32)
    indices = rationale_indices(int(m["teacher_nfe"]), num_states)
    tx = optim.make_optimizer(total_steps=int(config.train.num_steps), **config.optim.to_dict())
    ema_decay = float(config.train.get("ema_decay", 0.0))
    batch_size, num_pairs = int(config.data.batch_size), int(m["num_pairs"])

    def init(frozen, key):
        noise = pair_noise(int(m["pair_seed"]), num_pairs, shape)
        targets = generate_pairs(teacher_apply, frozen["teacher"], noise, schedule=schedule, prediction=prediction,
                                 solver=m["teacher_solver"], timesteps=times_teacher, indices=indices,
                                 batch_size=min(int(m["generate_batch"]), num_pairs),
                                 denoised=m["rationale"] == "denoised")
        params = widen_output(jax.tree.map(jnp.copy, frozen["teacher"]), num_states)
        return StepByStepState(step=jnp.zeros((), jnp.int32), params=params,
                               ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                               noise=noise, targets=targets)

    def update(state: StepByStepState, batch, frozen, key):
        index_key, renoise_key = jax.random.split(key)
        rows = jax.random.randint(index_key, (batch_size,), 0, num_pairs)

        def loss_fn(params):
            return distillation_loss(student_apply, params, state.noise[rows], state.targets[rows], times_student,
                                     renoise_key, schedule=schedule, prediction=prediction, channels=channels,
                                     alpha=alpha)

        (loss, (main, side)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state = optim.optimizer_step(tx, grads, state.opt_state, state.params)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
        new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new, {"loss": loss, "main_mse": main, "rationale_mse": side, "grad_norm": optax.tree.norm(grads)}

    def student(state: StepByStepState, use_ema: bool):
        return slice_output(state.ema_params if use_ema else state.params, channels)

    output = {"sample": {"solver": STUDENT_SOLVER, "nfe": int(m["student_steps"]), "spacing": m["student_spacing"]}}
    return Program(init=init, update=update, frozen={"teacher": teacher.params}, student=student,
                   metric_names=("loss", "main_mse", "rationale_mse", "grad_norm"), output=output, needs_data=False)


METHOD = Method(name="step_by_step", build=build, validate=validate,
                doc="distilling step-by-step: a one-step trajectory-distilled student with an auxiliary head "
                    "predicting the teacher's intermediate states (dropped at inference)")
