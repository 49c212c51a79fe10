"""DMD2: improved distribution matching distillation (Yin et al., NeurIPS 2024, arXiv 2405.14867).

    dpmjax finetune --method dmd2 --teacher runs/digits --workdir runs/digits_dmd2              # 1-step
    dpmjax finetune --method dmd2 --config configs/methods/dmd2.py:steps=4 --teacher ... --workdir ...
    dpmjax sample --workdir runs/digits_dmd2 --num 64        # the generator, through the "renoise" solver

A generator G (initialised from the teacher, read as an x0 predictor through the teacher's parameterisation) is
trained against two score networks: the frozen teacher ("real score") and a "fake score" network, initialised
from the teacher too, that keeps learning the generator's own distribution. Per update (official
``main/edm/edm_guidance.py`` / ``main/sd_guidance.py``, code-verified details in the module's references):

  Generator (every ``ttur``-th update; eq. 2 of DMD, Yin et al. 2024a, with DMD2's normaliser):
    x = G(x_{t_s}, t_s)                           x_{t_s}: backward simulation, below
    t ~ U[min_step_percent, max_step_percent] of the training range;  x_t = alpha_t x + sigma_t z
    p_real = x - x0_real(x_t),  p_fake = x - x0_fake(x_t)                 (no gradient through either)
    grad   = (p_real - p_fake) / mean|p_real|      (per sample)  = (x0_fake - x0_real) / mean|x - x0_real|
    L_DM   = 0.5 mean((x - sg(x - grad))^2)        so dL_DM/dx = grad / numel, the KL gradient s_fake - s_real
    L_G    = L_DM + gen_gan_weight E softplus(-D(x_t'))            (non-saturating GAN, Sec. 4.2)
  Critic (every update: the two time-scale update rule, Sec. 4.1):
    L_fake = E_t || f_fake(x_t, t) - target ||^2   on x = sg(G sample), the teacher's own target (eps / x0 / v)
    L_D    = E softplus(D(fake_t')) + E softplus(-D(real_t'))                 ("diffusion GAN": both noised)
    L_C    = L_fake + gan_weight L_D
  D = a small head (Conv3x3 -> GN -> SiLU -> mean over space -> Dense 1) on the fake score UNet's bottleneck
  (the middle block; dpmjax's UNet or the converted diffusers UNet2DModel), so L_D also trains the fake score
  network's encoder, as the official ``cls_pred_branch``.

Backward simulation (Sec. 4.3, the multi-step generator, timesteps t_0 > ... > t_{k-1} of the sampling grid):
pick s ~ U{0..k-1} (one per update, as the official code shares it across GPUs), run the current generator s
steps from pure noise without gradient -- x0_i = G(x_{t_i}, t_i), x_{t_i+1} = alpha x0_i + sigma z_i with fresh
z_i -- and train on x_{t_s}; the DM loss acts on that step's x0-prediction (official answer in issue #45: back-
propagating through all steps costs too much memory). Sampling (``dpmjax.samplers.renoise``) draws the same
noises in the same order (``fold_in(key, i)``), on the same grid (``time_grid(schedule, k, spacing)``).

Departures from the paper, and why:
  * Time: our teachers are VP (``DiscreteVP``) networks, not EDM ones: DM and GAN times are drawn over the
    schedule's training steps (integer n in [min_step_percent N, max_step_percent N], t = (n + 1)/N, as the
    official SD code) instead of 1000 Karras sigmas; the one-step generator reads pure noise at t = 1 (the
    official EDM generator: sigma = 80).
  * Fake score loss: the teacher's own unweighted denoising loss on its target (eps, x0 or v, times as
    ``dpmjax.train.losses.sample_times``), not EDM's weight 1/sigma^2 + 1/sigma_data^2 on the x0 error: the fake
    network starts as a copy of the teacher and keeps the loss (and so the weighting over time) it was trained
    with; for an x0 teacher the two differ only by that time weighting.
  * The GAN head is resolution-agnostic (mean over space) instead of the ImageNet-64 head's fixed strides.
  * Unconditional teachers only (the paper's ImageNet model is class-conditional: the labels would be drawn
    from the data batch and passed to all three networks; not wired here, ``validate`` refuses).
  * The critic and generator share one AdamW setting (the official scripts use the same lr for both).

Method config (``configs/methods/dmd2.py``): ``method.num_steps_gen`` (1 or k), ``spacing`` of the generator's
grid (default "trailing": on a 1000-step DiscreteVP exactly the official 999/749/499/249), ``ttur`` (critic
updates per generator update, official 5), ``gan`` (bool), ``gan_weight`` (critic, official ImageNet 1e-2),
``gen_gan_weight`` (generator, official 3e-3), ``min_step_percent`` / ``max_step_percent`` (0.02 / 0.98),
``gan_max_step_percent`` (the diffusion-GAN noise range, official all of it: 1.0). ``train.ema_decay``: the
generator's EMA, updated at each generator update.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dpmjax.methods.base import Method, Program, Teacher
from dpmjax.nn import network_time
from dpmjax.nn.layers import group_norm
from dpmjax.parameterization import expand_like, to_x0
from dpmjax.schedules import DiscreteVP, SPACINGS, time_grid
from dpmjax.train.losses import diffuse, sample_times, target_for
from dpmjax.train.optim import make_optimizer, optimizer_step
from dpmjax.train.state import ema_update

__all__ = ["METHOD", "DMD2State", "GANHead", "build", "validate", "generator_grid", "backward_simulation",
           "distribution_matching_loss", "discriminator_loss", "generator_gan_loss", "sample_time_range",
           "METHOD_DEFAULTS"]

# Every method setting with its default (the official ImageNet-64 / SDXL values where they exist).
METHOD_DEFAULTS = dict(num_steps_gen=1, spacing="trailing", ttur=5, gan=True, gan_weight=1e-2, gen_gan_weight=3e-3,
                       min_step_percent=0.02, max_step_percent=0.98, gan_max_step_percent=1.0)
METRIC_NAMES = ("loss_dm", "loss_gan_g", "generator_grad_norm", "loss_fake", "loss_gan_d", "critic_grad_norm",
                "d_real_logit", "d_fake_logit", "generator_updated")
_GENERATOR_SCALARS = ("loss_dm", "loss_gan_g", "generator_grad_norm")
# networks whose __call__ takes return_bottleneck=True: dpmjax's UNet and the diffusers port (`dpmjax convert`)
BOTTLENECK_MODELS = ("UNet", "DiffusersUNet2D")


@struct.dataclass
class DMD2State:
    step: jax.Array               # [] int32: updates done; the generator updates when step % ttur == 0
    generator: Any                # variables {"params": ...} of G (the teacher's architecture)
    generator_ema: Any            # EMA of ``generator`` (what the output workdir samples by default)
    generator_opt: Any            # AdamW state of the generator
    critic: Any                   # {"fake_score": variables, "head": GANHead variables (only with gan)}
    critic_opt: Any               # AdamW state of the critic (fake score + head)
    generator_scalars: Any        # {name: [] float32}: the last generator update's losses (logged every step)


class GANHead(nn.Module):
    """logit = Dense_1(mean_{h,w} SiLU(GN(Conv3x3(h)))) on bottleneck features h [B, H', W', C] -> [B]."""

    num_groups: int = 8

    @nn.compact
    def __call__(self, h):
        channels = h.shape[-1]
        h = nn.Conv(channels, (3, 3), name="conv")(h.astype(jnp.float32))
        h = nn.silu(group_norm(channels, self.num_groups, jnp.float32, jnp.float32, name="norm")(h))
        return nn.Dense(1, name="logit")(jnp.mean(h, axis=(1, 2)))[:, 0]


# ------------------------------------------------------------------------------------------- pure pieces

def generator_grid(schedule, num_steps_gen: int, spacing: str) -> np.ndarray:
    """The generator's k + 1 grid points [t_0 > ... > t_k] (float64): G is evaluated at t_0..t_{k-1}; t_k only
    closes the grid. ``dpmjax sample`` builds the same grid from (solver="renoise", nfe=k, spacing)."""
    return time_grid(schedule, num_steps_gen, spacing)


def backward_simulation(x0_fn, params, noise, key, num_run, times, schedule):
    """x_{t_s} for s = ``num_run``: the generator run s steps from ``noise`` at t_0, without gradient.

    x_{t_0} = noise;  x_{t_i+1} = alpha_{t_i+1} G(x_{t_i}, t_i) + sigma_{t_i+1} z_i,  z_i = normal(fold_in(key, i))
    (DMD2 Sec. 4.3; the draws of ``dpmjax.samplers.renoise``). ``num_run`` may be traced (a while loop).

    Args:
      x0_fn: ``x0_fn(params, x, t [B]) -> x0``; params: the generator's variables; noise: x_{t_0} [B, ...];
      times: the generator grid (``generator_grid``) as an array [k + 1].
    """
    batch = noise.shape[0]

    def body(i, x):
        x0 = x0_fn(params, x, jnp.full((batch,), times[i], times.dtype))
        t_next = jnp.full((batch,), times[i + 1], times.dtype)
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return expand_like(schedule.alpha(t_next), x) * x0 + expand_like(schedule.sigma(t_next), x) * z

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, num_run, body, noise))


def distribution_matching_loss(x, x0_real, x0_fake):
    """DMD2's distribution matching loss (``compute_distribution_matching_loss`` of the official code).

    p_real = x - x0_real, p_fake = x - x0_fake, grad = (p_real - p_fake) / mean|p_real| (per sample, DMD eq. 8's
    weighting), L = 0.5 mean((x - sg(x - grad))^2): dL/dx = grad / x.size, i.e. (x0_fake - x0_real)/normaliser.
    ``x0_real`` and ``x0_fake`` get no gradient. Returns (L, grad).
    """
    x0_real, x0_fake = jax.lax.stop_gradient(x0_real), jax.lax.stop_gradient(x0_fake)
    p_real, p_fake = x - x0_real, x - x0_fake
    axes = tuple(range(1, x.ndim))
    normaliser = jnp.mean(jnp.abs(p_real), axis=axes, keepdims=True)
    grad = jax.lax.stop_gradient(jnp.nan_to_num((p_real - p_fake) / normaliser))
    return 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - grad)) ** 2), grad


def discriminator_loss(logits_real, logits_fake):
    """Non-saturating GAN, discriminator side: E softplus(D(fake)) + E softplus(-D(real)) (DMD2 eq. 4)."""
    return jnp.mean(jax.nn.softplus(logits_fake)) + jnp.mean(jax.nn.softplus(-logits_real))


def generator_gan_loss(logits_fake):
    """Non-saturating GAN, generator side: E softplus(-D(G(z))) (DMD2 eq. 5)."""
    return jnp.mean(jax.nn.softplus(-logits_fake))


def sample_time_range(key, batch: int, schedule, lo: float, hi: float, dtype=jnp.float32):
    """t [B] in the fraction [lo, hi] of the training range: DiscreteVP integer n ~ U{int(lo N)..min(int(hi N), N-1)}
    with t = (n + 1)/N (the official ``randint(min_step, max_step + 1)``), else t ~ U over that part of
    [default_t_end, default_t_start]."""
    if isinstance(schedule, DiscreteVP):
        n_total = schedule.num_train_timesteps
        low, high = int(lo * n_total), min(int(hi * n_total) + 1, n_total)
        n = jax.random.randint(key, (batch,), low, max(high, low + 1))
        return ((n + 1) / n_total).astype(dtype)
    t_lo, t_hi = schedule.default_t_end, schedule.default_t_start
    return jax.random.uniform(key, (batch,), dtype, t_lo + lo * (t_hi - t_lo), t_lo + hi * (t_hi - t_lo))


# ------------------------------------------------------------------------------------------- settings

def _settings(config) -> dict:
    section = dict(config.method) if config.get("method") is not None else {}
    section.pop("name", None)
    unknown = sorted(set(section) - set(METHOD_DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown setting(s) {unknown} for dmd2; it accepts {sorted(METHOD_DEFAULTS)}")
    return {**METHOD_DEFAULTS, **section}


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting for anything ``build`` or the run would fail on (nothing is compiled)."""
    s = _settings(config)
    if not _is_int(s["num_steps_gen"]) or s["num_steps_gen"] < 1:
        raise ValueError(f"config.method.num_steps_gen must be a positive integer, got {s['num_steps_gen']!r}")
    if s["spacing"] not in SPACINGS:
        raise ValueError(f"config.method.spacing must be one of {SPACINGS}, got {s['spacing']!r}")
    if not _is_int(s["ttur"]) or s["ttur"] < 1:
        raise ValueError(f"config.method.ttur (critic updates per generator update) must be a positive integer, "
                         f"got {s['ttur']!r}")
    if not isinstance(s["gan"], bool):
        raise ValueError(f"config.method.gan must be True or False, got {s['gan']!r}")
    for name in ("gan_weight", "gen_gan_weight"):
        if not _is_real(s[name]) or s[name] < 0:
            raise ValueError(f"config.method.{name} must be a non-negative number, got {s[name]!r}")
    for name in ("min_step_percent", "max_step_percent", "gan_max_step_percent"):
        if not _is_real(s[name]) or not 0 <= s[name] <= 1:
            raise ValueError(f"config.method.{name} must be a fraction in [0, 1], got {s[name]!r}")
    if not s["min_step_percent"] < s["max_step_percent"]:
        raise ValueError(f"config.method.min_step_percent ({s['min_step_percent']}) must be below max_step_percent "
                         f"({s['max_step_percent']})")
    batch = config.get("data", {}).get("batch_size") if config.get("data") is not None else None
    if not _is_int(batch) or batch < 1:
        raise ValueError(f"config.data.batch_size must be a positive integer, got {batch!r}")
    if teacher.prediction not in ("eps", "x0", "v"):
        raise ValueError(f"dmd2 reads the teacher as an x0 predictor: its train.target must be eps, x0 or v, "
                         f"got {teacher.prediction!r}")
    if teacher.num_classes is not None:
        raise ValueError("dmd2 here distils unconditional teachers only; this teacher is class-conditional "
                         f"(model.num_classes={teacher.num_classes})")
    if s["gan"] and type(teacher.model).__name__ not in BOTTLENECK_MODELS:
        raise ValueError(f"config.method.gan=True puts the GAN head on a UNet's bottleneck ({BOTTLENECK_MODELS}); "
                         f"the teacher is a {type(teacher.model).__name__}: set config.method.gan=False")
    try:
        grid = generator_grid(teacher.schedule, s["num_steps_gen"], s["spacing"])
    except ValueError as err:
        raise ValueError(f"config.method.num_steps_gen={s['num_steps_gen']} with spacing {s['spacing']!r}: {err}") \
            from None
    if not np.isclose(grid[0], teacher.schedule.default_t_start):
        raise ValueError(f"config.method.spacing={s['spacing']!r}: the generator's first time must be the start of "
                         f"the schedule (pure noise), got t_0={grid[0]}")


# ------------------------------------------------------------------------------------------- the program

def build(config, teacher: Teacher) -> Program:
    """The DMD2 program for ``config`` and ``teacher`` (host side: no computation; teacher params may be abstract)."""
    validate(config, teacher)
    s = _settings(config)
    model, schedule, prediction = teacher.model, teacher.schedule, teacher.prediction
    num_steps_gen, ttur, use_gan = int(s["num_steps_gen"]), int(s["ttur"]), bool(s["gan"])
    grid = np.asarray(generator_grid(schedule, num_steps_gen, s["spacing"]), np.float32)
    batch_size = int(config.data.batch_size)
    image_shape = teacher.image_shape
    ema_decay = float(config.train.get("ema_decay", 0.0))
    optim = dict(config.optim) if config.get("optim") is not None else {}
    tx = make_optimizer(total_steps=int(config.train.num_steps), **optim)
    head = GANHead()

    def raw(variables, x, t, **kw):
        return model.apply(variables, x, network_time(schedule, t), train=False, **kw)

    def x0_fn(variables, x, t):
        return to_x0(raw(variables, x, t).astype(x.dtype), x, t, schedule, prediction)

    def fake_score_and_logits(critic, x_t, t):
        """(fake score output, GAN logits [B]): one pass of the fake UNet, the head on its bottleneck."""
        out, bottleneck = raw(critic["fake_score"], x_t, t, return_bottleneck=True)
        return out.astype(x_t.dtype), head.apply(critic["head"], bottleneck)

    def init(frozen, key):
        teacher_vars = frozen["teacher"]
        critic = {"fake_score": teacher_vars}
        if use_gan:
            x = jnp.zeros((1,) + image_shape, jnp.float32)
            shape = jax.eval_shape(lambda v: raw(v, x, jnp.ones((1,)), return_bottleneck=True)[1], teacher_vars)
            critic["head"] = head.init(key, jnp.zeros(shape.shape, jnp.float32))
        return DMD2State(step=jnp.zeros((), jnp.int32), generator=teacher_vars, generator_ema=teacher_vars,
                         generator_opt=tx.init(teacher_vars), critic=critic, critic_opt=tx.init(critic),
                         generator_scalars={k: jnp.zeros((), jnp.float32) for k in _GENERATOR_SCALARS})

    def generate(generator, noise, sim_key, step_index, times):
        """(x_{t_s} without gradient, t_s [B]): the generator's training input (a 1-step generator: the noise)."""
        if num_steps_gen == 1:
            return noise, jnp.full((noise.shape[0],), times[0], times.dtype)
        x_in = backward_simulation(x0_fn, generator, noise, sim_key, step_index, times, schedule)
        return x_in, jnp.full((noise.shape[0],), times[step_index], times.dtype)

    def generator_objective(generator, critic, teacher_vars, x_in, t_in, key):
        k_t, k_z, k_gan_t, k_gan_z = jax.random.split(key, 4)
        x = x0_fn(generator, x_in, t_in)
        batch = x.shape[0]
        t = sample_time_range(k_t, batch, schedule, s["min_step_percent"], s["max_step_percent"], x.dtype)
        x_t = diffuse(x, t, jax.random.normal(k_z, x.shape, x.dtype), schedule)
        x0_real = x0_fn(teacher_vars, x_t, t)
        if not use_gan:
            loss_dm, _ = distribution_matching_loss(x, x0_real, x0_fn(critic["fake_score"], x_t, t))
            return loss_dm, (x, loss_dm, jnp.zeros((), x.dtype))
        # one fake-UNet pass for both terms: [x_t for the DM loss (no gradient), x_gan for the GAN loss]
        t_gan = sample_time_range(k_gan_t, batch, schedule, 0.0, s["gan_max_step_percent"], x.dtype)
        x_gan = diffuse(x, t_gan, jax.random.normal(k_gan_z, x.shape, x.dtype), schedule)
        inputs, times = jnp.concatenate([jax.lax.stop_gradient(x_t), x_gan]), jnp.concatenate([t, t_gan])
        out, logits = fake_score_and_logits(critic, inputs, times)
        x0_fake = to_x0(out[:batch], inputs[:batch], t, schedule, prediction)
        loss_dm, _ = distribution_matching_loss(x, x0_real, x0_fake)
        loss_gan = generator_gan_loss(logits[batch:])
        return loss_dm + s["gen_gan_weight"] * loss_gan, (x, loss_dm, loss_gan)

    def critic_objective(critic, fake, real, key):
        k_t, k_z, k_gan_t, k_gan_z = jax.random.split(key, 4)
        batch = fake.shape[0]
        t = sample_times(k_t, batch, schedule, fake.dtype)
        noise = jax.random.normal(k_z, fake.shape, fake.dtype)
        target = target_for(fake, noise, t, schedule, prediction)
        x_t = diffuse(fake, t, noise, schedule)
        zero = jnp.zeros((), fake.dtype)
        if not use_gan:
            out = raw(critic["fake_score"], x_t, t).astype(fake.dtype)
            loss_fake = jnp.mean((out - target) ** 2)
            return loss_fake, (loss_fake, zero, zero, zero)
        # one fake-UNet pass: [x_t for the denoising loss, fake and real images noised for the diffusion GAN]
        both = jnp.concatenate([fake, real.astype(fake.dtype)])
        t_gan = sample_time_range(k_gan_t, 2 * batch, schedule, 0.0, s["gan_max_step_percent"], fake.dtype)
        x_gan = diffuse(both, t_gan, jax.random.normal(k_gan_z, both.shape, both.dtype), schedule)
        out, logits = fake_score_and_logits(critic, jnp.concatenate([x_t, x_gan]), jnp.concatenate([t, t_gan]))
        loss_fake = jnp.mean((out[:batch] - target) ** 2)
        logits_fake, logits_real = logits[batch:2 * batch], logits[2 * batch:]
        loss_d = discriminator_loss(logits_real, logits_fake)
        return loss_fake + s["gan_weight"] * loss_d, (loss_fake, loss_d, jnp.mean(logits_real),
                                                       jnp.mean(logits_fake))

    def update(state: DMD2State, batch, frozen, key):
        teacher_vars = frozen["teacher"]
        times = jnp.asarray(grid)
        k_noise, k_sim, k_index, k_gen, k_critic = jax.random.split(key, 5)
        noise = jax.random.normal(k_noise, (batch_size,) + image_shape, jnp.float32)
        step_index = jax.random.randint(k_index, (), 0, num_steps_gen)
        x_in, t_in = generate(state.generator, noise, k_sim, step_index, times)
        is_generator_step = state.step % ttur == 0

        def generator_update(_):
            grad_fn = jax.value_and_grad(generator_objective, has_aux=True)
            (_, (x, loss_dm, loss_gan)), grads = grad_fn(state.generator, state.critic, teacher_vars, x_in, t_in,
                                                         k_gen)
            params, opt = optimizer_step(tx, grads, state.generator_opt, state.generator)
            scalars = {"loss_dm": loss_dm.astype(jnp.float32), "loss_gan_g": loss_gan.astype(jnp.float32),
                       "generator_grad_norm": optax.tree.norm(grads).astype(jnp.float32)}
            return params, opt, ema_update(state.generator_ema, params, ema_decay), jax.lax.stop_gradient(x), scalars

        def no_generator_update(_):
            x = jax.lax.stop_gradient(x0_fn(state.generator, x_in, t_in))
            return state.generator, state.generator_opt, state.generator_ema, x, state.generator_scalars

        generator, generator_opt, generator_ema, fake, gen_scalars = jax.lax.cond(
            is_generator_step, generator_update, no_generator_update, None)
        real = batch["image"] if use_gan else None
        grad_fn = jax.value_and_grad(critic_objective, has_aux=True)
        (_, (loss_fake, loss_d, logit_real, logit_fake)), grads = grad_fn(state.critic, fake, real, k_critic)
        critic, critic_opt = optimizer_step(tx, grads, state.critic_opt, state.critic)
        new = DMD2State(step=state.step + 1, generator=generator, generator_ema=generator_ema,
                        generator_opt=generator_opt, critic=critic, critic_opt=critic_opt,
                        generator_scalars=gen_scalars)
        scalars = dict(gen_scalars, loss_fake=loss_fake.astype(jnp.float32), loss_gan_d=loss_d.astype(jnp.float32),
                       critic_grad_norm=optax.tree.norm(grads).astype(jnp.float32),
                       d_real_logit=logit_real.astype(jnp.float32), d_fake_logit=logit_fake.astype(jnp.float32),
                       generator_updated=is_generator_step.astype(jnp.float32))
        return new, scalars

    def student(state: DMD2State, use_ema: bool):
        return state.generator_ema if use_ema else state.generator

    output = {"sample": {"solver": "renoise", "nfe": num_steps_gen, "spacing": s["spacing"]}}
    return Program(init=init, update=update, frozen={"teacher": teacher.params}, student=student,
                   metric_names=METRIC_NAMES, output=output, needs_data=use_gan)


METHOD = Method(name="dmd2", build=build, validate=validate,
                doc="DMD2 (Yin et al. 2024): 1- or k-step generator by distribution matching + TTUR + GAN")
