"""Multiscale structure-guided diffusion for image deblurring (Ren, Delbracio, Talebi, Gerig, Milanfar, ICCV 2023,
arXiv 2212.01789): trainers and restorers of the regression baseline, the icDPM and the guided icDPM.

    python experiments/deblur.py                                   # all three on 16 x 16 digits, CSV + PNG
    state, history = train(config, "guided", sharp_images)         # config: configs/deblur_digits.py
    restored = make_restorer(config, "guided")(state.ema_params, blurry, key)

Variants (``VARIANTS``), all the same ``dpmjax.nn.deblur.DeblurUNet`` body:

* ``regression``: x_hat = y + UNet(y) trained on || x_hat - x ||^2 (the paper's deterministic baseline; a
  residual over the blurry input, the usual choice for restoration networks);
* ``icdpm``: the image-conditioned DPM, eps_theta(concat(x_t, y), t) (eq. 2 of ``dpmjax.nn.deblur``), trained on
  the denoising loss with ``config.train.target`` (eps / x0 / v; Ho et al. 2020 eq. 14 for eps):

      L_diffusion = E_{x, y, t, eps} || f_theta(alpha_t x + sigma_t eps, t, y) - target ||^2

* ``guided``: icDPM + multiscale structure guidance (Sec. 3.2), trained jointly on

      L = L_diffusion + lambda sum_{f in factors} || G_f(y) - down_f(gray(x)) ||^2                  (4)

  with lambda = ``config.deblur.guidance_weight`` and factors ``config.deblur.guidance_factors``.

The pairs (x, y) are made inside the jitted update: y = k * x + n with k, sigma_n drawn from the training family
``config.blur.train`` (``dpmjax.data.blur``), a fresh kernel per image and step. Restoration draws x_T ~ N(0, I)
and runs a registered solver (``config.sample``: DPM-Solver++(2M) at 10-20 NFE) on the params-as-arguments model
``apply_fn(params, x, t, blurry=y)`` (``dpmjax.samplers.make_param_sampler``): a new checkpoint or another blurry
batch of the same shape never recompiles.

Why a trainer module here and not a ``dpmjax finetune --method``: a finetune method starts from a teacher
workdir and the shared loop feeds it real images; deblurring trains from scratch on (sharp, blurry) pairs with a
network of its own (the icDPM has input channels and guidance blocks no teacher has). Nor is it a
``dpmjax train`` objective: that loop builds ``config.model`` through ``dpmjax.nn.build_model`` with the generic
``apply_fn(params, x, t, y)``, which would need a new model kind and a conditioning input the data pipeline does
not produce. So this module is the factory-of-pure-functions pattern (``build`` returns ``init`` and ``update``,
STYLE.md 3) over dpmjax's optimizer (``dpmjax.train.optim``), EMA (``dpmjax.train.state``) and denoising pieces
(``dpmjax.train.losses``), with a plain host loop (``train``); it is not in ``dpmjax.methods.METHODS`` (which lists
teacher-based finetune methods). Params, EMA and optimizer state are arguments of the jitted update.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dpmjax.data.blur import BlurFamily, check_family, degrade, guidance_targets
from dpmjax.nn import network_time
from dpmjax.nn.deblur import DeblurUNet
from dpmjax.samplers.driver import make_param_sampler
from dpmjax.schedules import schedule_from_config
from dpmjax.train.losses import TARGETS, diffuse, sample_times, target_for
from dpmjax.train.optim import make_optimizer, optimizer_step
from dpmjax.train.state import ema_decay_at, ema_update

__all__ = ["VARIANTS", "DeblurState", "DeblurProgram", "blur_family", "model_for", "validate", "build",
           "check_blurry", "make_restorer", "train", "load_images"]

VARIANTS = ("regression", "icdpm", "guided")
MODEL_FIELDS = ("model_channels", "channel_mult", "num_res_blocks", "dropout", "num_groups", "guidance_channels",
                "guidance_blocks")


@struct.dataclass
class DeblurState:
    step: jax.Array          # [] int32
    params: Any              # DeblurUNet params
    ema_params: Any          # their exponential moving average (what restores)
    opt_state: Any           # optax state


class DeblurProgram(NamedTuple):
    """``init(key) -> DeblurState``; ``update(state, sharp [B, H, W, C], key) -> (state, scalars)``;
    ``loss(params, sharp, key) -> (loss, scalars)`` (the objective ``update`` descends). All pure."""

    init: Callable
    update: Callable
    loss: Callable
    model: DeblurUNet


def blur_family(section) -> BlurFamily:
    """A ``BlurFamily`` from a config section (``config.blur.train`` / ``config.blur.heldout``)."""
    section = dict(section)
    return BlurFamily(kind=section["kind"], strength=tuple(section["strength"]),
                      kernel_size=int(section["kernel_size"]), noise_std=tuple(section["noise_std"]),
                      anisotropy=float(section.get("anisotropy", 1.0)))


def model_for(config, variant: str) -> DeblurUNet:
    """The ``DeblurUNet`` of ``variant``: the regression net reads y alone, icDPM concatenates y, guided adds G_f."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    fields = {name: config.model[name] for name in MODEL_FIELDS if name in config.model}
    fields["channel_mult"] = tuple(fields.get("channel_mult", (1, 2, 2)))
    factors = tuple(int(f) for f in config.deblur.guidance_factors) if variant == "guided" else ()
    return DeblurUNet(condition_on_blurry=variant != "regression", guidance_factors=factors, **fields)


def validate(config, variant: str) -> None:
    """Raise ``ValueError`` naming the setting for anything the run would fail on, before anything compiles."""
    model = model_for(config, variant)
    model.check_guidance()
    image_shape = tuple(config.data.image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"config.data.image_shape must be (H, W, C), got {image_shape}")
    for name in ("train", "heldout"):
        if name in config.blur:
            check_family(blur_family(config.blur[name]), image_shape, name=f"config.blur.{name}")
    if config.train.target not in TARGETS:
        raise ValueError(f"config.train.target must be one of {TARGETS}, got {config.train.target!r}")
    if variant == "guided":
        if not config.deblur.guidance_factors:
            raise ValueError("config.deblur.guidance_factors is empty: the guided variant needs at least one scale")
        if config.deblur.guidance_weight < 0:
            raise ValueError(f"config.deblur.guidance_weight must be >= 0, got {config.deblur.guidance_weight}")
    if config.data.batch_size < 1 or config.train.num_steps < 1:
        raise ValueError("config.data.batch_size and config.train.num_steps must be positive")


def check_blurry(blurry, image_shape) -> None:
    """Raise ``ValueError`` if a batch of blurry images [B, H, W, C] is not of the model's ``image_shape``."""
    shape = tuple(np.shape(blurry))
    if len(shape) != 4 or shape[1:] != tuple(image_shape):
        raise ValueError(f"blurry images have shape {shape}; the model restores [B, *config.data.image_shape] = "
                         f"[B, {', '.join(str(n) for n in image_shape)}] (size and channel count must match)")


def _optimizer(config):
    return make_optimizer(total_steps=config.train.num_steps, **dict(config.optim))


def build(config, variant: str) -> DeblurProgram:
    """The pure ``init`` / ``update`` of ``variant`` (see the module docstring for the losses)."""
    validate(config, variant)
    model = model_for(config, variant)
    schedule = schedule_from_config(config.schedule)
    family = blur_family(config.blur.train)
    target = config.train.target
    factors = tuple(int(f) for f in config.deblur.guidance_factors)
    guidance_weight = float(config.deblur.guidance_weight)
    ema_decay = float(config.train.ema_decay)
    tx = _optimizer(config)
    image_shape = tuple(config.data.image_shape)

    def init(key):
        x = jnp.zeros((1,) + image_shape, jnp.float32)
        blurry = None if variant == "regression" else x
        params = model.init(key, x, jnp.zeros((1,), jnp.float32), blurry)["params"]
        return DeblurState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                           opt_state=tx.init(params))

    def loss_fn(params, sharp, key):
        k_blur, k_t, k_noise = jax.random.split(key, 3)
        blurry, _, _ = degrade(k_blur, sharp, family)
        if variant == "regression":
            restored = blurry + model.apply({"params": params}, blurry, jnp.zeros(sharp.shape[:1], sharp.dtype))
            loss = jnp.mean((restored - sharp) ** 2)
            return loss, {"loss": loss, "restore_mse": loss}
        t = sample_times(k_t, sharp.shape[0], schedule, sharp.dtype)
        noise = jax.random.normal(k_noise, sharp.shape, sharp.dtype)
        x_t = diffuse(sharp, t, noise, schedule)
        out, predictions = model.apply({"params": params}, x_t, network_time(schedule, t).astype(sharp.dtype),
                                       blurry, train=True, return_guidance=True)
        diffusion = jnp.mean((out - target_for(sharp, noise, t, schedule, target)) ** 2)
        scalars = {"diffusion": diffusion}
        loss = diffusion
        if variant == "guided":
            structure = sum(jnp.mean((p - s) ** 2) for p, s in zip(predictions, guidance_targets(sharp, factors)))
            loss = loss + guidance_weight * structure
            scalars["guidance"] = structure
        scalars["loss"] = loss
        return loss, scalars

    def update(state, sharp, key):
        (_, scalars), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, sharp, key)
        params, opt_state = optimizer_step(tx, grads, state.opt_state, state.params)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
        scalars["grad_norm"] = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))
        return DeblurState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), scalars

    return DeblurProgram(init=init, update=update, loss=loss_fn, model=model)


def make_restorer(config, variant: str, *, nfe: int | None = None, solver: str | None = None) -> Callable:
    """``restore(params, blurry [B, H, W, C], key) -> restored`` for ``variant``, jitted once per shape.

    Regression: one forward pass. icDPM / guided: x_T ~ N(0, I) from ``key`` and ``config.sample.solver`` at
    ``nfe`` model calls (default ``config.sample.nfe``) on ``config.sample.spacing``, the blurry batch passed as
    conditioning (an argument of the compiled sampler, not a constant). Outputs are clipped to the data range
    [-1, 1], as DDPM's final samples are. Raises ``ValueError`` for blurry images of
    another size or channel count than ``config.data.image_shape``, before anything runs.
    """
    model = model_for(config, variant)
    image_shape = tuple(config.data.image_shape)
    if variant == "regression":
        @jax.jit
        def regress(params, blurry):
            restored = blurry + model.apply({"params": params}, blurry, jnp.zeros(blurry.shape[:1], blurry.dtype))
            return jnp.clip(restored, -1.0, 1.0)

        def restore_regression(params, blurry, key=None):
            check_blurry(blurry, image_shape)
            return regress(params, jnp.asarray(blurry, jnp.float32))

        return restore_regression

    schedule = schedule_from_config(config.schedule)

    def apply_fn(params, x, t, blurry):
        return model.apply({"params": params}, x, network_time(schedule, t).astype(x.dtype), blurry)

    sampler = make_param_sampler(apply_fn, schedule=schedule, solver=solver or config.sample.solver,
                                 nfe=nfe or config.sample.nfe, spacing=config.sample.spacing,
                                 prediction=config.train.target)

    def restore(params, blurry, key):
        check_blurry(blurry, image_shape)
        blurry = jnp.asarray(blurry, jnp.float32)
        x_T = jax.random.normal(key, blurry.shape, jnp.float32)
        return jnp.clip(sampler(params, x_T, key, blurry=blurry), -1.0, 1.0)

    restore.cache_size = sampler.cache_size
    return restore


def load_images(config, split: str = "train") -> np.ndarray:
    """Sharp images [N, *config.data.image_shape] in [-1, 1] from ``config.data.name`` ("digits" or
    "fashion_mnist"), bilinearly resized to the configured side (digits 8 x 8 -> 16 x 16: a blur of a few pixels
    would erase an 8 x 8 digit)."""
    from dpmjax.data import get_dataset
    from dpmjax.metrics.domain import all_images

    images, _ = all_images(get_dataset(config.data.name, split))
    height, width, channels = tuple(config.data.image_shape)
    if images.shape[-1] != channels:
        raise ValueError(f"config.data.image_shape has {channels} channels, {config.data.name} has {images.shape[-1]}")
    if images.shape[1:3] != (height, width):
        images = np.asarray(jax.image.resize(jnp.asarray(images), (len(images), height, width, channels), "linear"))
    return np.clip(images, -1.0, 1.0).astype(np.float32)


def train(config, variant: str, sharp_images, *, num_steps: int | None = None, log: Callable | None = print):
    """Train ``variant`` on ``sharp_images`` [N, H, W, C] (pairs made on the fly); returns (state, history).

    History: one dict per ``config.train.log_every`` steps with the step, the mean scalars since the last log and
    the wall seconds per step (the first interval includes compilation). One compiled update (params, EMA and
    optimizer state as arguments, donated).
    """
    program = build(config, variant)
    sharp_images = np.asarray(sharp_images, np.float32)
    check_blurry(sharp_images, tuple(config.data.image_shape))
    num_steps = int(num_steps or config.train.num_steps)
    batch = int(config.data.batch_size)
    if batch > len(sharp_images):
        raise ValueError(f"config.data.batch_size={batch} exceeds the {len(sharp_images)} training images")
    key = jax.random.key(int(config.seed))
    state = jax.jit(program.init)(jax.random.fold_in(key, 0))
    update = jax.jit(program.update, donate_argnums=0)
    rng = np.random.default_rng(int(config.seed))
    history, pending, start = [], [], time.perf_counter()
    order, cursor = rng.permutation(len(sharp_images)), 0
    for step in range(num_steps):
        if cursor + batch > len(order):
            order, cursor = rng.permutation(len(sharp_images)), 0
        sharp = jnp.asarray(sharp_images[order[cursor:cursor + batch]])
        cursor += batch
        state, scalars = update(state, sharp, jax.random.fold_in(key, step + 1))
        pending.append(scalars)
        if (step + 1) % int(config.train.log_every) == 0 or step + 1 == num_steps:
            means = {name: float(np.mean([float(s[name]) for s in pending])) for name in pending[0]}
            elapsed = time.perf_counter() - start
            history.append({"step": step + 1, **means, "sec_per_step": elapsed / len(pending)})
            if log:
                log(f"[{variant}] step {step + 1}/{num_steps} " + " ".join(f"{k}={v:.4g}" for k, v in means.items()))
            pending, start = [], time.perf_counter()
    if not all(np.isfinite(h["loss"]) for h in history):
        raise FloatingPointError(f"{variant}: the loss went non-finite: {history}")
    return state, history
