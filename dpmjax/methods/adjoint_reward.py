"""Reward finetuning by gradients through the sampler (AdjointDPM: Pan, Liew, Tan, Feng, Yan, ICLR 2024,
arXiv 2307.10711), the gradient-based baseline of PRDP for a differentiable reward.

Each update draws B fresh noises x_T (and B classes for a class-conditional teacher), generates
x_0 = Phi_theta(x_T, c) with the probability-flow ODE and ascends the reward of the results,

    L(theta) = -(1/B) sum_b r(clip(Phi_theta(x_T^b, c_b), -1, 1), c_b),

with dL/dtheta from ``dpmjax.adjoint.value_and_grad_through_sampling``: adjoint="backsolve" is the paper's
continuous adjoint (memory flat in the number of steps, gradient approximate), "checkpoint" the exact gradient of
the discretised ODE, "scan" backprop through a registered dpmjax solver. B reward queries per update (each one
a reward value and its gradient), so an equal budget with PRDP / DDPO is B x updates = G n x epochs.

Like AdjointDPM's finetuning experiments (and DRaFT / AlignProp), the objective is the reward alone: no KL to
the teacher, so whatever raises the reward is taken, reward hacking included; the teacher is kept only as the
starting point. The reward must be differentiable (``Reward.differentiable``: a classifier reward, not JPEG).

Settings (``config.method``): reward (``dpmjax.metrics.rewards.reward_from_spec``), batch B, steps (solver
steps on a fixed grid; the ODE's cost is steps x the solver's stages), adjoint, solver (ODE methods: heun, the
default, or euler; "scan": a dpmjax solver, default dpmpp_2m), spacing. The output workdir samples the map it was
trained through: diffrax's heun / euler on the rho grid are the registered ``heun`` / ``euler`` solvers (Karras
Alg. 1 in the same variables, equal to 1e-14 in float64: ``tests/test_adjoint_reward.py``), at steps x stages NFE.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpmjax.adjoint import METHODS as ADJOINT_METHODS
from dpmjax.adjoint import value_and_grad_through_sampling
from dpmjax.adjoint.rho_ode import rho_grid
from dpmjax.methods.base import Method, Program, StudentState, Teacher, method_settings
from dpmjax.metrics.rewards import check_conditioning, reward_from_spec, validate_reward
from dpmjax.samplers import SOLVERS
from dpmjax.samplers.driver import plan
from dpmjax.schedules import SPACINGS
from dpmjax.train import optim
from dpmjax.train.state import ema_decay_at, ema_update

__all__ = ["METHOD", "DEFAULTS", "STAGES"]

DEFAULTS = dict(reward="classifier:digits:3", batch=16, steps=5, adjoint="backsolve", solver=None,
                spacing="logSNR")
STAGES = {"euler": 1, "heun": 2}  # model calls per step of the ODE solvers that a registered solver repeats


def _solver(m) -> str:
    if m["solver"] is not None:
        return m["solver"]
    return "dpmpp_2m" if m["adjoint"] == "scan" else "heun"


def _output_sampler(m) -> dict:
    """The ``sample`` section of the output workdir: the registered solver that computes the trained map."""
    solver, steps = _solver(m), int(m["steps"])
    nfe = steps if m["adjoint"] == "scan" else STAGES[solver] * steps
    return {"solver": solver, "nfe": nfe, "spacing": m["spacing"]}


def validate(config, teacher: Teacher) -> None:
    m = method_settings(config, DEFAULTS)
    unknown = sorted(set(m) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown adjoint_reward settings {unknown}; known: {sorted(DEFAULTS)}")
    for name in ("batch", "steps"):
        value = m[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"config.method.{name} must be a positive integer, got {value!r}")
    if m["adjoint"] not in ADJOINT_METHODS:
        raise ValueError(f"config.method.adjoint must be one of {ADJOINT_METHODS}, got {m['adjoint']!r}")
    choices = SOLVERS if m["adjoint"] == "scan" else STAGES
    if m["solver"] is not None and m["solver"] not in choices:
        raise ValueError(f"config.method.solver for adjoint={m['adjoint']!r} must be None or one of "
                         f"{sorted(choices)}, got {m['solver']!r}")
    if m["spacing"] not in SPACINGS:
        raise ValueError(f"config.method.spacing must be one of {SPACINGS}, got {m['spacing']!r}")
    try:  # the sampler's grid for these steps (e.g. a 2-call solver needs an even NFE under "scan")
        if m["adjoint"] == "scan":
            plan(teacher.schedule, _solver(m), nfe=int(m["steps"]), spacing=m["spacing"])
        else:
            rho_grid(teacher.schedule, num_steps=int(m["steps"]), spacing=m["spacing"], adaptive=False)
    except ValueError as err:
        raise ValueError(f"config.method: {m['steps']} steps of {_solver(m)} ({m['adjoint']}): {err}") from None
    reward = reward_from_spec(m["reward"], image_shape=teacher.image_shape)
    if not reward.differentiable:
        raise ValueError(f"config.method.reward {m['reward']!r} is not differentiable (a host function such as "
                         f"JPEG size has no gradient): adjoint_reward needs e.g. a classifier reward; PRDP and DDPO "
                         f"(--method prdp / ddpo) take black-box rewards")
    check_conditioning(reward, m["reward"], teacher.num_classes)
    validate_reward(reward, teacher.image_shape, teacher.num_classes)


def build(config, teacher: Teacher) -> Program:
    m = method_settings(config, DEFAULTS)
    batch, steps = int(m["batch"]), int(m["steps"])
    reward = reward_from_spec(m["reward"], image_shape=teacher.image_shape)
    apply_fn, schedule, prediction = teacher.apply_fn(), teacher.schedule, teacher.prediction
    shape, num_classes = teacher.image_shape, teacher.num_classes
    tx = optim.make_optimizer(total_steps=int(config.train.num_steps), **config.optim.to_dict())
    ema_decay = float(config.train.get("ema_decay", 0.0))
    # check_finite off: a NaN loss or gradient already stops the loop (non-finite scalars: loss, grad_norm)
    # before anything is saved, without a reduction over every gradient and a host callback in each update
    options = dict(schedule=schedule, method=m["adjoint"], wrt=("params",), num_steps=steps, solver=_solver(m),
                   spacing=m["spacing"], prediction=prediction, has_aux=True, check_finite=False)

    def init(frozen, key):
        params = jax.tree.map(jnp.copy, frozen["teacher"])
        return StudentState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                            opt_state=tx.init(params))

    def update(state: StudentState, batch_, frozen, key):
        del batch_
        k_labels, k_noise = jax.random.split(key)
        x_T = jax.random.normal(k_noise, (batch,) + shape, jnp.float32)
        if num_classes is not None:
            labels = jax.random.randint(k_labels, (batch,), 0, num_classes)
            cond = {"y": labels}
        else:
            labels, cond = jnp.zeros((batch,), jnp.int32), None

        def loss_fn(x_0):
            rewards = reward.fn(frozen["reward"], jnp.clip(x_0, -1.0, 1.0), labels).astype(jnp.float32)
            return -jnp.mean(rewards), rewards

        (loss, rewards), grads = value_and_grad_through_sampling(loss_fn, apply_fn, state.params, x_T, cond,
                                                                 **options)
        grads = grads["params"]
        params, opt_state = optim.optimizer_step(tx, grads, state.opt_state, state.params)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
        scalars = {"loss": loss, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
                   "grad_norm": optax.tree.norm(grads)}
        return StudentState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), scalars

    def student(state: StudentState, use_ema: bool):
        return state.ema_params if use_ema else state.params

    return Program(init=init, update=update, frozen={"teacher": teacher.params, "reward": reward.params},
                   student=student, output={"sample": _output_sampler(m)}, needs_data=False,
                   metric_names=("loss", "reward_mean", "reward_std", "grad_norm"))


METHOD = Method(name="adjoint_reward", build=build, validate=validate,
                doc="AdjointDPM: finetune for a differentiable reward by gradients through the probability-flow ODE")
