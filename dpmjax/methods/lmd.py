"""LMD, Latent Masking Diffusion (Ma, Yu, Li, Zhou, AAAI 2024, arXiv 2312.07971): masked autoencoding of VAE latents
with a masking ratio that rises over training.

    dpmjax train --config configs/vae_fashion_mnist.py --workdir runs/vae_fashion        # the frozen VAE ("teacher")
    dpmjax finetune --method lmd --teacher runs/vae_fashion --workdir runs/lmd_fashion
    dpmjax finetune --method lmd --teacher runs/vae_fashion --workdir runs/mae_fashion \
        --config configs/methods/lmd.py:schedule=fixed                                   # the MAE baseline

Images x -> frozen VAE encoder, z = s * mu(x) (the posterior mode, as LMD's ``posterior.mode()``; s = 1 / std of
the training latents, ``dpmjax.data.latents``) -> p x p latent patches z_1..z_N. A random subset M of
round(r_k N) patches is masked at step k; an MAE-style ViT encoder E reads the visible patches only, a light
decoder D reads E's tokens plus a learned mask token at every masked position (He et al. 2022, Sec. 3), and the
loss is the squared error on the masked patches only (MAE eq. "loss on masked patches"; LMD Sec. 3.2):

    L_k = 1/|M| sum_{i in M} || D(E(z_{not M}))_i - z_i ||^2 / (p p c)

The "diffusion" is the curriculum r_k on the training step k of K (LMD Sec. 3.3, the official engine_pretrain.py):
    linear:    r_k = r_0 + (r_1 - r_0) k / K
    piecewise: r_0 -> r_0 + 5/12 (r_1 - r_0) (0.40 for 0.15 -> 0.75) over the first K/6, held to K/3, -> r_1 at 2K/3,
               then r_1
    cosine:    r_k = r_0 + (r_1 - r_0) (1 - cos^2(pi/2 (f + 0.008)/1.008) / cos^2(pi/2 0.008/1.008)),
               f = min(k / (2K/3), 1)   (the official code's active default)
    fixed:     r_k = r_1 (MAE's constant 0.75, the baseline)
with r_0 = ``start_ratio`` = 0.15 and r_1 = ``end_ratio`` = 0.75.

Departures, and why:
  * Fixed shapes. MAE drops masked tokens before the encoder, so the sequence length changes with r_k: every
    ratio would compile another program (30 programs for 49 patches). Here the encoder runs on all N tokens with
    the masked ones removed from every attention's keys (``key_mask``); the visible tokens' outputs are then exactly
    MAE's (attention, LayerNorm and MLP act per token; ``tests/test_lmd.py`` checks it against the gathered,
    literal MAE encoder, ``encode_visible_only``), and one compiled update serves every ratio, the ratio being data
    (STYLE rule 4). The cost: the encoder's FLOPs do not fall as r_k rises, so wall-clock per step is equal for
    every schedule and LMD's speed claim shows up only as steps-to-error, not as cheaper steps.
  * No class token: the linear probe (``pooled_features``) mean-pools the encoder's tokens (MAE's ``global_pool``).
  * AdamW (LMD uses Adan, not in optax) and an unnormalised patch target by default (``norm_patch_loss=True`` gives
    MAE's norm_pix_loss), so the training loss is the reported masked-patch error.

The frozen VAE enters as the "teacher" of the method contract (``dpmjax.methods.base.Teacher``; its params are an
argument of the jitted update). The output workdir keeps the VAE's ``model`` section (so ``dpmjax.workdir``
rebuilds the teacher); ``load_lmd(WORKDIR)`` returns the masked autoencoder, and ``dpmjax sample`` refuses the
workdir (it holds no sampler). ``replacement_model_fn`` is the latent-DPM inpainting baseline (DDIM with x0
replacement on the known patches) the experiment compares LMD's one-pass reconstruction with.

config.method fields (defaults in ``DEFAULTS``): schedule, start_ratio, end_ratio (each in (0, 1)), patch_size,
hidden_size, depth, num_heads, decoder_hidden_size, decoder_depth, decoder_num_heads, mlp_ratio, latent_scale
(0: 1 / std of the VAE's training latents), norm_patch_loss.
"""
from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpmjax.methods.base import Method, Program, StudentState, Teacher, method_settings
from dpmjax.nn.layers import layer_norm, sincos_pos_embed_2d
from dpmjax.train import optim
from dpmjax.train.state import ema_decay_at, ema_update

__all__ = ["METHOD", "DEFAULTS", "SCHEDULES", "mask_ratio", "random_patch_mask", "patchify", "unpatchify",
           "MaskedAutoencoder", "masked_patch_loss", "reconstruct", "pooled_features", "replacement_model_fn",
           "build_autoencoder", "load_lmd", "validate", "build"]

SCHEDULES = ("linear", "piecewise", "cosine", "fixed")
DEFAULTS: dict = dict(schedule="cosine", start_ratio=0.15, end_ratio=0.75, patch_size=1, hidden_size=64, depth=4,
                      num_heads=4, decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0,
                      latent_scale=0.0, norm_patch_loss=False)


# ------------------------------------------------------------------------------------------------ the curriculum

def mask_ratio(step, num_steps: int, schedule: str, start: float = 0.15, end: float = 0.75):
    """[] float32: the masking ratio r_k at training step ``step`` of ``num_steps`` (module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"mask schedule must be one of {SCHEDULES}, got {schedule!r}")
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / float(max(num_steps, 1)), 0.0, 1.0)
    if schedule == "fixed":
        return jnp.full((), end, jnp.float32)
    if schedule == "linear":
        return (start + (end - start) * frac).astype(jnp.float32)
    if schedule == "piecewise":
        mid = start + (end - start) * 5.0 / 12.0  # 0.40 for 0.15 -> 0.75, the official knots
        knots = jnp.array([0.0, 1 / 6, 1 / 3, 2 / 3, 1.0], jnp.float32)
        values = jnp.array([start, mid, mid, end, end], jnp.float32)
        return jnp.interp(frac, knots, values)
    f = jnp.minimum(frac * 1.5, 1.0)  # over the first 2/3 of the steps
    offset = 0.008
    cos2 = lambda u: jnp.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2  # noqa: E731
    return (start + (end - start) * (1.0 - cos2(f) / cos2(0.0))).astype(jnp.float32)


def random_patch_mask(key, batch: int, num_patches: int, ratio):
    """[B, N] bool, True = masked: round(ratio N) patches (at least 1, at most N - 1) chosen uniformly per sample
    (MAE's argsort of uniform noise); ``ratio`` may be traced, the shape never changes."""
    num_masked = jnp.clip(jnp.round(ratio * num_patches), 1, num_patches - 1).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, num_patches)), axis=1), axis=1)
    return ranks < num_masked


def patchify(latents, patch_size: int):
    """[B, h, w, c] -> [B, (h/p)(w/p), p p c] (row-major patches)."""
    b, h, w, c = latents.shape
    p = patch_size
    x = latents.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches, latent_shape, patch_size: int):
    """Inverse of ``patchify``: [B, N, p p c] -> [B, h, w, c]."""
    h, w, c = latent_shape
    p, b = patch_size, patches.shape[0]
    x = patches.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


# ------------------------------------------------------------------------------------------------ the network

class _Block(nn.Module):
    """Pre-LN transformer block; ``key_mask`` [B, N] (True = may be attended to) removes tokens from the keys."""

    num_heads: int
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x, key_mask=None):
        b, n, d = x.shape
        heads = self.num_heads
        h = layer_norm(jnp.float32, jnp.float32, "norm_attn")(x)
        q, k, v = jnp.split(nn.Dense(3 * d, name="qkv")(h).reshape(b, n, 3, heads, d // heads), 3, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q[:, :, 0], k[:, :, 0]) / jnp.sqrt(jnp.float32(d // heads))
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.float32(-1e30))
        h = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v[:, :, 0]).reshape(b, n, d)
        x = x + nn.Dense(d, name="proj")(h)
        h = layer_norm(jnp.float32, jnp.float32, "norm_mlp")(x)
        h = nn.Dense(d, name="mlp_out")(nn.gelu(nn.Dense(int(d * self.mlp_ratio), name="mlp_in")(h)))
        return x + h


class MaskedAutoencoder(nn.Module):
    """MAE on latents: ``__call__(latents [B, h, w, c], masked [B, N]) -> predicted patches [B, N, p p c]``.

    ``encode`` runs the encoder with masked tokens out of every attention (fixed shapes, module docstring);
    ``encode_visible_only`` is the literal MAE encoder on the gathered visible tokens (the oracle of the tests).
    """

    latent_shape: tuple
    patch_size: int = 1
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    decoder_hidden_size: int = 32
    decoder_depth: int = 1
    decoder_num_heads: int = 2
    mlp_ratio: float = 4.0

    def setup(self):
        h, w, _ = self.latent_shape
        p = self.patch_size
        self.grid = (h // p, w // p)
        self.embed = nn.Dense(self.hidden_size, name="patch_embed")
        self.blocks = [_Block(self.num_heads, self.mlp_ratio, name=f"block_{i}") for i in range(self.depth)]
        self.norm = layer_norm(jnp.float32, jnp.float32, "encoder_norm")
        self.decoder_embed = nn.Dense(self.decoder_hidden_size, name="decoder_embed")
        self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (self.decoder_hidden_size,))
        self.decoder_blocks = [_Block(self.decoder_num_heads, self.mlp_ratio, name=f"decoder_block_{i}")
                               for i in range(self.decoder_depth)]
        self.decoder_norm = layer_norm(jnp.float32, jnp.float32, "decoder_norm")
        self.head = nn.Dense(self.patch_size ** 2 * self.latent_shape[-1], name="decoder_pred")

    def _tokens(self, latents):
        pos = jnp.asarray(sincos_pos_embed_2d(self.hidden_size, *self.grid), jnp.float32)
        return self.embed(patchify(latents.astype(jnp.float32), self.patch_size)) + pos[None]

    def encode(self, latents, masked):
        """[B, N, D] encoder tokens; rows of masked positions are computed but never read."""
        tokens = self._tokens(latents)
        for block in self.blocks:
            tokens = block(tokens, key_mask=~masked)
        return self.norm(tokens)

    def encode_visible_only(self, latents, visible_index):
        """The literal MAE encoder: tokens gathered at ``visible_index`` [B, V] (static V), no attention mask."""
        tokens = jnp.take_along_axis(self._tokens(latents), visible_index[:, :, None], axis=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def __call__(self, latents, masked):
        tokens = self.decoder_embed(self.encode(latents, masked))
        tokens = jnp.where(masked[:, :, None], self.mask_token[None, None, :], tokens)
        pos = jnp.asarray(sincos_pos_embed_2d(self.decoder_hidden_size, *self.grid), jnp.float32)
        tokens = tokens + pos[None]
        for block in self.decoder_blocks:
            tokens = block(tokens)
        return self.head(self.decoder_norm(tokens))


def build_autoencoder(settings: dict, latent_shape) -> MaskedAutoencoder:
    """The ``MaskedAutoencoder`` of a method config's settings for latents of ``latent_shape`` (h, w, c)."""
    fields = ("patch_size", "hidden_size", "depth", "num_heads", "decoder_hidden_size", "decoder_depth",
              "decoder_num_heads", "mlp_ratio")
    return MaskedAutoencoder(latent_shape=tuple(int(n) for n in latent_shape),
                             **{name: settings[name] for name in fields})


def masked_patch_loss(module, params, latents, masked, *, norm_patch_loss: bool = False):
    """(L, per-sample L): mean squared error over the masked patches only (module docstring)."""
    target = patchify(latents.astype(jnp.float32), module.patch_size)
    if norm_patch_loss:  # MAE's norm_pix_loss: each patch standardised
        mean, var = target.mean(-1, keepdims=True), target.var(-1, keepdims=True)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    per_patch = jnp.mean(jnp.square(module.apply(params, latents, masked) - target), axis=-1)
    weights = masked.astype(jnp.float32)
    per_sample = jnp.sum(per_patch * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return jnp.sum(per_patch * weights) / jnp.maximum(jnp.sum(weights), 1.0), per_sample


def reconstruct(module, params, latents, masked):
    """Latents [B, h, w, c] with the masked patches replaced by the autoencoder's prediction (one pass)."""
    patches = patchify(latents.astype(jnp.float32), module.patch_size)
    predicted = module.apply(params, latents, masked)
    return unpatchify(jnp.where(masked[:, :, None], predicted, patches), module.latent_shape, module.patch_size)


def pooled_features(module, params, latents):
    """[B, D]: the encoder's tokens of the whole (unmasked) latent, mean-pooled (the linear probe's features)."""
    masked = jnp.zeros(patchify(latents, module.patch_size).shape[:2], bool)
    return jnp.mean(module.apply(params, latents, masked, method=MaskedAutoencoder.encode), axis=1)


# ------------------------------------------------------------------------------------------------ DPM baseline

def replacement_model_fn(model_fn, schedule, known, known_mask, prediction: str = "eps"):
    """``model_fn(x, t) -> x0``: inpainting by replacement, for any dpmjax solver run with ``prediction="x0"``.

    The network's data prediction x0_theta(x_t, t) is overwritten on the known entries (``known_mask`` True) by
    the known latents: x0' = m * z_known + (1 - m) * x0_theta. With DDIM (x_s = alpha_s x0' + sigma_s
    (x_t - alpha_t x0') / sigma_t) the known entries then follow alpha_t z_known + sigma_t n with the fixed
    noise n of x_T, and the unknown ones are generated consistently with them through the network (the
    replacement method of Song et al. 2021, App. I.2, applied to the x0-prediction instead of x_t; no RePaint
    resampling). ``known``: [B, h, w, c]; ``known_mask``: broadcastable to it.
    """
    from dpmjax.parameterization import to_x0

    def inpainting_fn(x, t):
        x0 = to_x0(model_fn(x, t), x, t, schedule, prediction)
        return jnp.where(known_mask, known.astype(x0.dtype), x0)

    return inpainting_fn


# ------------------------------------------------------------------------------------------------ the method

def _settings(config) -> dict:
    return method_settings(config, DEFAULTS)


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting: unknown fields, a schedule outside ``SCHEDULES``, ratios outside (0, 1), a
    patch size that does not divide the latent, a teacher that is not a VAE."""
    settings = _settings(config)
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown lmd settings {unknown}; it has {sorted(DEFAULTS)}")
    if teacher.config.model.get("kind") != "vae":
        raise ValueError(f"--teacher {teacher.workdir}: LMD masks the latents of a VAE (config.model.kind='vae', "
                         f"`dpmjax train --config configs/vae_fashion_mnist.py`), got a "
                         f"{teacher.config.model.get('kind')!r} model")
    if settings["schedule"] not in SCHEDULES:
        raise ValueError(f"config.method.schedule must be one of {SCHEDULES}, got {settings['schedule']!r}")
    for name in ("start_ratio", "end_ratio"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"config.method.{name} is a mask ratio and must be in (0, 1), got {value!r}")
    for name in ("patch_size", "hidden_size", "depth", "num_heads", "decoder_hidden_size", "decoder_depth",
                 "decoder_num_heads"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.method.{name} must be an integer >= 1, got {value!r}")
    for width, heads in (("hidden_size", "num_heads"), ("decoder_hidden_size", "decoder_num_heads")):
        if settings[width] % settings[heads] or settings[width] % 4:
            raise ValueError(f"config.method.{width}={settings[width]} must be a multiple of 4 and of "
                             f"config.method.{heads}={settings[heads]}")
    from dpmjax.nn.vae import latent_shape

    h, w, _ = latent_shape(teacher.model)
    if h % settings["patch_size"] or w % settings["patch_size"]:
        raise ValueError(f"config.method.patch_size={settings['patch_size']} does not divide the VAE's latent "
                         f"{h}x{w}")
    scale = settings["latent_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0 or not np.isfinite(scale):
        raise ValueError(f"config.method.latent_scale must be 0 (1 / std of the latents) or > 0, got {scale!r}")


def _latent_scale(settings, teacher: Teacher) -> np.ndarray:
    """s: the configured scale, else 1 / std of the VAE's training latents (cached in its workdir); 1 for an
    abstract teacher (a finished workdir loading its state's shapes: s is not needed there)."""
    if settings["latent_scale"] > 0:
        return np.float32(settings["latent_scale"])
    if teacher.workdir is None or isinstance(jax.tree.leaves(teacher.params)[0], jax.ShapeDtypeStruct):
        return np.float32(1.0)
    import ml_collections

    from dpmjax.data.latents import latent_scale

    data = teacher.config.data.to_dict()
    data["latent"] = {"vae_workdir": teacher.workdir, "scale_factor": 0.0}
    return np.float32(latent_scale(ml_collections.ConfigDict({"data": data})))


def build(config, teacher: Teacher) -> Program:
    from dpmjax.methods.adaptation import make_optimizer
    from dpmjax.nn.vae import VAE, latent_shape

    settings = _settings(config)
    shape = latent_shape(teacher.model)
    module = build_autoencoder(settings, shape)
    num_steps, ema_decay = int(config.train.num_steps), float(config.train.get("ema_decay", 0.0))
    tx = make_optimizer(config)
    vae = teacher.model
    p = settings["patch_size"]
    num_patches = (shape[0] // p) * (shape[1] // p)

    def init(frozen, key):
        latents = jnp.zeros((1, *shape), jnp.float32)
        params = module.init(key, latents, jnp.zeros((1, num_patches), bool))
        return StudentState(step=jnp.zeros((), jnp.int32), params=params,
                            ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))

    def update(state: StudentState, batch, frozen, key):
        mean, _ = vae.apply(frozen["vae"], batch["image"], method=VAE.encode)
        latents = jax.lax.stop_gradient(mean) * frozen["latent_scale"]
        ratio = mask_ratio(state.step, num_steps, settings["schedule"], settings["start_ratio"],
                           settings["end_ratio"])
        masked = random_patch_mask(key, latents.shape[0], num_patches, ratio)
        (loss, _), grads = jax.value_and_grad(masked_patch_loss, argnums=1, has_aux=True)(
            module, state.params, latents, masked, norm_patch_loss=bool(settings["norm_patch_loss"]))
        params, opt_state = optim.optimizer_step(tx, grads, state.opt_state, state.params)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
        new = StudentState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new, {"loss": loss, "mask_ratio": ratio, "grad_norm": optax.tree.norm(grads)}

    def student(state: StudentState, use_ema: bool):
        return state.ema_params if use_ema else state.params

    frozen = {"vae": teacher.params, "latent_scale": _latent_scale(settings, teacher)}
    return Program(init=init, update=update, frozen=frozen, student=student,
                   metric_names=("loss", "mask_ratio", "grad_norm"))


def load_lmd(workdir: str, *, use_ema: bool = True):
    """(masked autoencoder module, its variables, latent scale s, the workdir's config) of an LMD workdir."""
    from dpmjax.methods.loop import restore_method_state
    from dpmjax.nn.vae import latent_shape
    from dpmjax.workdir import load_config_of

    config = load_config_of(workdir)
    if config.get("method") is None or config.method.get("name") != "lmd":
        raise ValueError(f"{workdir} is not an LMD workdir (`dpmjax finetune --method lmd`)")
    program, teacher, state = restore_method_state(config, os.path.abspath(workdir))
    settings = _settings(config)
    module = build_autoencoder(settings, latent_shape(teacher.model))
    scale = settings["latent_scale"]
    if not scale:
        from dpmjax.workdir import load_teacher
        scale = float(_latent_scale(settings, load_teacher(config.teacher.workdir)))
    return module, program.student(state, use_ema), float(scale), config


def _sample_workdir(workdir, num, **kwargs):
    raise ValueError(f"{workdir} holds LMD's masked autoencoder of VAE latents, not a diffusion model: nothing to "
                     "sample; reconstruct masked latents with dpmjax.methods.lmd.load_lmd and reconstruct")


METHOD = Method(name="lmd", build=build, validate=validate, sample_workdir=_sample_workdir,
                doc="LMD: masked autoencoding of frozen-VAE latents with a rising mask ratio (linear / piecewise / "
                    "cosine, or fixed = MAE)")
