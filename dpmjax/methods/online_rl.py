"""The online loop of reward finetuning, shared by PRDP (``prdp.py``) and DDPO / REINFORCE (``ddpo.py``).

One epoch = ``updates_per_epoch`` (K) updates of the finetune loop (PRDP Alg. 1, DDPO Alg. 1):

    update k = 0 of an epoch:  theta_old <- theta;  draw G groups (a class each for a class-conditional teacher)
                               of n samples;  sample their trajectories with pi_old (stochastic DDIM,
                               ``dpmjax.samplers.policy``);  reward the final images (G n reward queries);
                               log pi_ref of every step under the frozen teacher
    every update:              one optimizer step on objective(log pi_theta, log pi_old, log pi_ref, rewards) of
                               that epoch's trajectories

Everything is one jitted update: the epoch's sampling sits in a ``lax.cond`` on the step count, the buffer of
trajectories is part of the method's state (checkpointed with it: a resumed run continues its epoch), the
teacher's and the reward's params are frozen arguments, a host reward runs through ``jax.pure_callback``.
The student starts as the teacher, which stays the reference pi_ref. The output workdir samples with the
policy the student was trained as when eta = 1 (``sample`` section: the ``ddpm`` solver, T steps, the grid's
spacing).

Settings (``config.method``): reward (``dpmjax.metrics.rewards.reward_from_spec``), groups G, group_size n,
steps T, eta, spacing, updates_per_epoch K, classes (the "prompts": a class-conditional teacher's groups draw
their classes from 0 .. classes - 1; None = all), plus the objective's own (``objective_defaults``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dpmjax.methods.base import Method, Program, Teacher, method_settings
from dpmjax.metrics.rewards import check_conditioning, reward_from_spec, validate_reward
from dpmjax.samplers import policy
from dpmjax.samplers.driver import plan
from dpmjax.schedules import SPACINGS
from dpmjax.train import optim
from dpmjax.train.state import ema_decay_at, ema_update

__all__ = ["OnlineState", "COMMON_DEFAULTS", "make_method", "policy_timesteps"]

COMMON_DEFAULTS = dict(reward="jpeg_incompressibility", groups=4, group_size=4, steps=10, eta=1.0,
                       spacing="time_uniform", updates_per_epoch=4, classes=None)


@struct.dataclass
class OnlineState:
    step: jax.Array          # [] int32: updates done
    params: Any              # pi_theta
    ema_params: Any
    opt_state: Any
    old_params: Any          # pi_old: the snapshot that sampled this epoch's trajectories
    states: jax.Array        # [T + 1, G n, H, W, C]: the epoch's trajectories
    labels: jax.Array        # [G n] int32: their classes (zeros for an unconditional teacher)
    log_probs_old: jax.Array  # [G, n, T]
    log_probs_ref: jax.Array  # [G, n, T]
    rewards: jax.Array       # [G, n]


def policy_timesteps(config, teacher: Teacher, defaults=COMMON_DEFAULTS) -> np.ndarray:
    """The policy's grid t_0 > ... > t_T (float64): the ``ddim`` plan of T steps on ``spacing``."""
    m = method_settings(config, defaults)
    return np.asarray(plan(teacher.schedule, "ddim", nfe=int(m["steps"]), spacing=m["spacing"],
                           eta=float(m["eta"])).grid["t"], np.float64)


def _int_at_least(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"config.method.{name} must be an integer >= {minimum}, got {value!r}")


def make_method(name: str, doc: str, objective_defaults: dict, check_objective: Callable, objective: Callable,
                metric_names: tuple) -> Method:
    """A registered method on the online loop.

    ``objective(settings, log_probs, log_probs_old, log_probs_ref, rewards) -> (loss, stats)`` with [G, n, T]
    log-probabilities and [G, n] rewards; ``check_objective(settings)`` raises ValueError naming a bad setting;
    ``metric_names`` the objective's stats (logged beside loss, reward_mean, reward_std, grad_norm, log_ratio).
    """
    defaults = dict(COMMON_DEFAULTS, **objective_defaults)

    def validate(config, teacher: Teacher) -> None:
        m = method_settings(config, defaults)
        unknown = sorted(set(m) - set(defaults))
        if unknown:
            raise ValueError(f"config.method: unknown {name} settings {unknown}; known: {sorted(defaults)}")
        _int_at_least(m["groups"], "groups", 1)
        _int_at_least(m["group_size"], "group_size", 2)  # pairs within a group / a group baseline
        _int_at_least(m["steps"], "steps", 1)
        _int_at_least(m["updates_per_epoch"], "updates_per_epoch", 1)
        if m["classes"] is not None:
            if teacher.num_classes is None:
                raise ValueError("config.method.classes draws the groups' classes of a class-conditional teacher; "
                                 "this teacher is unconditional (leave classes None)")
            _int_at_least(m["classes"], "classes", 1)
            if m["classes"] > teacher.num_classes:
                raise ValueError(f"config.method.classes must be at most the teacher's {teacher.num_classes} "
                                 f"classes, got {m['classes']}")
        policy.check_eta(m["eta"])
        if m["spacing"] not in SPACINGS:
            raise ValueError(f"config.method.spacing must be one of {SPACINGS}, got {m['spacing']!r}")
        check_objective(m)
        try:
            policy_timesteps(config, teacher, defaults)
        except ValueError as err:
            raise ValueError(f"config.method: the policy cannot run {m['steps']} steps: {err}") from None
        reward = reward_from_spec(m["reward"], image_shape=teacher.image_shape)
        check_conditioning(reward, m["reward"], teacher.num_classes)
        validate_reward(reward, teacher.image_shape, teacher.num_classes)  # a probe batch, before any compile

    def build(config, teacher: Teacher) -> Program:
        m = method_settings(config, defaults)
        groups, size, steps_t = int(m["groups"]), int(m["group_size"]), int(m["steps"])
        updates_per_epoch, eta = int(m["updates_per_epoch"]), float(m["eta"])
        batch = groups * size
        reward = reward_from_spec(m["reward"], image_shape=teacher.image_shape)
        times = policy_timesteps(config, teacher, defaults)
        apply_fn, schedule, prediction = teacher.apply_fn(), teacher.schedule, teacher.prediction
        shape = teacher.image_shape
        num_classes = teacher.num_classes
        prompts = num_classes if m["classes"] is None else int(m["classes"])  # groups draw classes 0 .. prompts-1
        tx = optim.make_optimizer(total_steps=int(config.train.num_steps), **config.optim.to_dict())
        ema_decay = float(config.train.get("ema_decay", 0.0))

        def cond_of(labels):
            return {"y": labels} if num_classes is not None else {}

        def log_probs(params, states, labels):  # [T, G n] -> [G, n, T]
            lp = policy.trajectory_log_probs(apply_fn, params, states, times, schedule=schedule,
                                             prediction=prediction, eta=eta, cond=cond_of(labels))
            return jnp.transpose(lp).reshape(groups, size, steps_t)

        def init(frozen, key):
            params = jax.tree.map(jnp.copy, frozen["teacher"])
            zeros = jnp.zeros((groups, size, steps_t), jnp.float32)
            return OnlineState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                               opt_state=tx.init(params), old_params=params,
                               states=jnp.zeros((steps_t + 1, batch) + shape, jnp.float32),
                               labels=jnp.zeros((batch,), jnp.int32), log_probs_old=zeros, log_probs_ref=zeros,
                               rewards=jnp.zeros((groups, size), jnp.float32))

        def new_epoch(state, frozen, key):
            k_labels, k_noise, k_steps = jax.random.split(key, 3)
            if num_classes is not None:
                labels = jnp.repeat(jax.random.randint(k_labels, (groups,), 0, prompts), size)
            else:
                labels = jnp.zeros((batch,), jnp.int32)
            x_T = jax.random.normal(k_noise, (batch,) + shape, jnp.float32)
            traj = policy.sample_trajectory(apply_fn, state.params, x_T, k_steps, times, schedule=schedule,
                                            prediction=prediction, eta=eta, cond=cond_of(labels))
            images = jnp.clip(traj.states[-1], -1.0, 1.0)
            rewards = reward.fn(frozen["reward"], images, labels).astype(jnp.float32).reshape(groups, size)
            lp_old = jnp.transpose(traj.log_probs).reshape(groups, size, steps_t)
            lp_ref = log_probs(frozen["teacher"], traj.states, labels)
            return state.replace(old_params=state.params, states=traj.states, labels=labels,
                                 log_probs_old=lp_old, log_probs_ref=lp_ref, rewards=rewards)

        def update(state, batch_, frozen, key):
            del batch_
            k_epoch, _ = jax.random.split(key)
            state = jax.lax.cond(state.step % updates_per_epoch == 0,
                                 lambda s: new_epoch(s, frozen, k_epoch), lambda s: s, state)

            def loss_fn(params):
                lp = log_probs(params, state.states, state.labels)
                return objective(m, lp, state.log_probs_old, state.log_probs_ref, state.rewards)

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            params, opt_state = optim.optimizer_step(tx, grads, state.opt_state, state.params)
            ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
            scalars = {"loss": loss, "reward_mean": jnp.mean(state.rewards), "reward_std": jnp.std(state.rewards),
                       "grad_norm": optax.tree.norm(grads),
                       "log_ratio": jnp.mean(state.log_probs_old - state.log_probs_ref)}
            scalars.update({k: jnp.asarray(v, jnp.float32) for k, v in stats.items()})
            return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), scalars

        def student(state: OnlineState, use_ema: bool):
            return state.ema_params if use_ema else state.params

        # the policy's own sampler: eta = 1 is the registry's "ddpm"; for eta < 1 `dpmjax sample` has no eta
        # setting and runs deterministic DDIM on the same grid (sample_trajectory runs the policy itself)
        output = {"sample": {"solver": "ddpm" if eta == 1.0 else "ddim", "nfe": steps_t, "spacing": m["spacing"]}}
        return Program(init=init, update=update, frozen={"teacher": teacher.params, "reward": reward.params},
                       student=student, output=output, needs_data=False,
                       metric_names=("loss", "reward_mean", "reward_std", "grad_norm", "log_ratio") + metric_names)

    return Method(name=name, build=build, validate=validate, doc=doc)

