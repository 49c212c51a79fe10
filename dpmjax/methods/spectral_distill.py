"""Spectrum-aware distillation of Spectral Diffusion (Yang et al., "Diffusion Probabilistic Model Made Slim",
CVPR 2023, arXiv 2211.17106): a slim student (typically a UNet with wavelet gating) trained from scratch on the teacher's
data, guided by the big teacher's multi-scale features in space and in frequency.

    dpmjax finetune --method spectral_distill --teacher runs/digits --workdir runs/digits_slim_wg \
        --config configs/methods/spectral_distill.py:wg=true,distill=true
    dpmjax sample --workdir runs/digits_slim_wg --num 64

The loss (the paper's spectrum-aware distillation objective; numbering not recorded in our notes):

    L = L_DDPM + lambda_s L_spatial + lambda_f L_freq
    L_DDPM    = || f_S(x_t, t) - target(x_0, eps, t) ||^2                           (the teacher's target: eps/x0/v)
    L_spatial = sum_i mean || X_T^i - P_i(X_S^i) ||^2 / E_i,        E_i = mean ||X_T^i||^2 (departure (e))
    L_freq    = sum_i mean w_i || DFT(X_T^i) - DFT(P_i(X_S^i)) ||^2 / E_i,
                w_i = (|DFT(resize(x_0, H_i x W_i))| + eps_i)^alpha / mean(...)     (alpha = -1)

Matching (the paper matches "multi-scale features" without a rule a UNet of another width can use): X^i is the
output of the *last* residual block at each spatial resolution of a network's forward pass -- for a UNet the
decoder's last block at that level, the features its upsampling path hands on -- read with flax method
interception (``nn.intercept_methods``, as ``dpmjax.nn.side`` does: no network is modified; teacher blocks are
``ResBlock`` or the diffusers port's ``ResnetBlock2D``). Resolutions present in both networks are matched; P_i is
a learned 1x1 convolution C_S^i -> C_T^i (kernel and bias), trained with the student and dropped at the output.

Departures, and why: (a) means over elements instead of sums (the weights then do not depend on the feature
sizes; lambda = 0.1 as in the paper). (b) The DFT is the orthonormal 2D DFT over H, W per channel, so with w = 1
L_freq would equal L_spatial (Parseval); w is the clean image's amplitude spectrum, averaged over its channels,
resized to the feature's size by antialiased linear interpolation, raised to alpha and normalised to mean 1 over
the frequencies of each image -- so L_freq only *redistributes* the spatial error toward the frequencies where
the image is weak (alpha = -1: high frequencies). (c) eps_i = ``freq_eps`` (0.05) times the mean amplitude of
that image: bounds the weights where the image's spectrum is ~0 (flat backgrounds), which otherwise dominated
the loss. (d) The teacher runs in eval mode (no dropout); the student in training mode. (e) Each level's squared
error is divided by the mean square of the teacher's feature at that level (a constant, no gradient): the raw
block outputs of the digits teacher have mean squares of ~1e3, so the paper's unnormalised sums with lambda = 0.1
were ~100x L_DDPM and, under gradient clipping, stalled the denoising loss (measured on the runlocal run). With
the normalisation each term is a relative error (1 for a zero student feature) and lambda = 0.1 keeps the paper's
balance of "denoising first, features as guidance".

With lambda_s = lambda_f = 0 the teacher is never run: plain denoising training of the student from scratch (the
paper's baseline, same loop, same data, same budget).

config.method:
  student_model: the student's ``model`` section (a dict, ``kind: "unet"``; e.g. a slim UNet with
      ``wavelet_gating=True``). Required. The output workdir's ``model`` is this section, so ``dpmjax sample``
      builds the student.
  lambda_spatial (0.1), lambda_freq (0.1): lambda_s, lambda_f.
  alpha (-1.0): the exponent of the frequency weight. freq_eps (0.05): see (c).
config.data: the teacher's dataset by default (``batch_size`` images per update); config.seed: the student's init.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dpmjax.methods import adaptation
from dpmjax.methods.base import Method, Program, Teacher, method_settings

__all__ = ["METHOD", "build", "validate", "frequency_weight", "block_features", "matched_sides",
           "spectral_losses", "student_module"]

DEFAULTS: dict = {"student_model": None, "lambda_spatial": 0.1, "lambda_freq": 0.1, "alpha": -1.0, "freq_eps": 0.05}
BLOCK_CLASSES = ("ResBlock", "ResnetBlock2D")


def frequency_weight(x0, size, alpha: float = -1.0, eps: float = 0.05):
    """w [B, h, w, 1] = (|DFT2(resize(x0))| + eps mean|DFT2|)^alpha, normalised to mean 1 over (h, w) per image.

    ``x0`` [B, H, W, C] clean images, ``size`` (h, w) of the feature map; |DFT2| is the orthonormal amplitude averaged
    over the channels (Spectral Diffusion's w = |DFT(x0)|^alpha; module docstring (b), (c))."""
    batch, _, _, channels = x0.shape
    small = jax.image.resize(x0.astype(jnp.float32), (batch, size[0], size[1], channels), "linear", antialias=True)
    amplitude = jnp.mean(jnp.abs(jnp.fft.fft2(small, axes=(1, 2), norm="ortho")), axis=-1, keepdims=True)
    floor = eps * jnp.mean(amplitude, axis=(1, 2), keepdims=True) + 1e-12
    weight = (amplitude + floor) ** alpha
    return weight / jnp.mean(weight, axis=(1, 2), keepdims=True)


def block_features(model, variables, x, t, **kwargs):
    """(output, {side: feature [B, side, W_i, C_i]}): ``model.apply`` with the output of the last residual block
    (``BLOCK_CLASSES``) at each spatial side recorded (later blocks overwrite earlier ones of the same side)."""
    features = {}

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if context.method_name == "__call__" and type(context.module).__name__ in BLOCK_CLASSES:
            features[int(out.shape[1])] = out
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, x, t, **kwargs)
    return out, features


def student_module(settings):
    """The student's flax module from ``method.student_model``."""
    from dpmjax.nn import build_model

    return build_model(ml_collections.ConfigDict(dict(settings["student_model"])))


def _conditioning(module, batch):
    return batch.get("label") if getattr(module, "num_classes", None) is not None else None


def _feature_shapes(module, variables, image_shape, conditional):
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if conditional else None
    return jax.eval_shape(lambda v, x, t: block_features(module, v, x, t, y=y)[1], variables, x, t)


def matched_sides(teacher: Teacher, student, student_variables) -> dict:
    """{side: (C_student, C_teacher)} of the resolutions where both networks have residual blocks (shapes only)."""
    teacher_shapes = _feature_shapes(teacher.model, teacher.params, teacher.image_shape, teacher.num_classes is not None)
    student_shapes = _feature_shapes(student, student_variables, teacher.image_shape,
                                     getattr(student, "num_classes", None) is not None)
    return {side: (int(student_shapes[side].shape[-1]), int(teacher_shapes[side].shape[-1]))
            for side in sorted(set(teacher_shapes) & set(student_shapes))}


def spectral_losses(teacher_features: dict, student_features: dict, projections: dict, x0, *, alpha: float,
                    eps: float):
    """(L_spatial, L_freq) over the matched sides (``projections`` keyed by str(side): {"kernel" [C_S, C_T],
    "bias" [C_T]}); module docstring for the equations."""
    spatial = freq = jnp.zeros((), jnp.float32)
    for key, proj in projections.items():
        side = int(key)
        target = teacher_features[side].astype(jnp.float32)
        projected = student_features[side].astype(jnp.float32) @ proj["kernel"] + proj["bias"]
        energy = jax.lax.stop_gradient(jnp.mean(target ** 2)) + 1e-6  # see (e): each level's term starts near 1
        spatial = spatial + jnp.mean((target - projected) ** 2) / energy
        weight = frequency_weight(x0, target.shape[1:3], alpha, eps)
        diff = jnp.fft.fft2(target - projected, axes=(1, 2), norm="ortho")
        freq = freq + jnp.mean(weight * jnp.abs(diff) ** 2) / energy
    return spatial, freq


def _check_number(settings, name, low=None):
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (low is not None and value < low):
        raise ValueError(f"config.method.{name} must be a finite number" + (f" >= {low}" if low is not None else "")
                         + f", got {value!r}")


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting: unknown settings, a missing or unbuildable ``student_model``, a wavelet-gating
    student on sides it cannot halve, negative weights, no matched resolution while distilling."""
    settings = method_settings(config, DEFAULTS)
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown spectral_distill settings {unknown}; it has {sorted(DEFAULTS)}")
    for name in ("lambda_spatial", "lambda_freq"):
        _check_number(settings, name, 0.0)
    _check_number(settings, "alpha")
    _check_number(settings, "freq_eps", 0.0)
    spec = settings["student_model"]
    if not hasattr(spec, "keys") or spec.get("kind") != "unet":
        raise ValueError(f"config.method.student_model must be a model section with kind 'unet' (e.g. a slim UNet "
                         f"with wavelet_gating=True), got {spec!r}")
    try:
        student = student_module(settings)
    except TypeError as err:
        raise ValueError(f"config.method.student_model: {err}") from None
    height, width = teacher.image_shape[:2]
    if spec.get("wavelet_gating"):
        from dpmjax.nn.unet import check_wavelet_sizes

        try:
            check_wavelet_sizes(student.channel_mult, height, width)
        except ValueError as err:
            raise ValueError(f"config.method.student_model: {err}") from None
    if settings["lambda_spatial"] or settings["lambda_freq"]:
        variables = jax.eval_shape(lambda: _init_student(student, teacher.image_shape, jax.random.key(0)))
        if not matched_sides(teacher, student, variables):
            raise ValueError("config.method: no resolution has residual blocks in both the teacher and "
                             "config.method.student_model, so there are no features to distil; set lambda_spatial = "
                             "lambda_freq = 0 or give the student the teacher's resolutions")


def _init_student(student, image_shape, key):
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if getattr(student, "num_classes", None) is not None else None
    return student.init(key, x, jnp.zeros((1,)), y=y)


def build(config, teacher: Teacher) -> Program:
    """The student's random init (from the run's key) and 1x1 projections; the loss of the module docstring."""
    from dpmjax.nn import network_time

    settings = method_settings(config, DEFAULTS)
    student = student_module(settings)
    lambda_s, lambda_f = float(settings["lambda_spatial"]), float(settings["lambda_freq"])
    alpha, eps = float(settings["alpha"]), float(settings["freq_eps"])
    distil = bool(lambda_s or lambda_f)
    schedule, prediction, image_shape = teacher.schedule, teacher.prediction, teacher.image_shape
    sides = {}
    if distil:
        abstract = jax.eval_shape(lambda: _init_student(student, image_shape, jax.random.key(0)))
        sides = matched_sides(teacher, student, abstract)

    def init(frozen, key):
        student_key, proj_key = jax.random.split(key)
        projections = {}
        for i, (side, (c_s, c_t)) in enumerate(sides.items()):
            kernel = jax.random.normal(jax.random.fold_in(proj_key, i), (c_s, c_t)) / math.sqrt(c_s)
            projections[str(side)] = {"kernel": kernel, "bias": jnp.zeros((c_t,))}
        return {"student": _init_student(student, image_shape, student_key), "proj": projections}

    def loss(trainable, frozen, batch, key):
        noise_key, dropout_key = jax.random.split(key)
        x_t, t, target = adaptation.noised(batch, noise_key, schedule, prediction)
        time = network_time(schedule, t)
        kwargs = dict(y=_conditioning(student, batch), train=True, rngs={"dropout": dropout_key})
        if not distil:
            out = student.apply(trainable["student"], x_t, time, **kwargs)
            ddpm = jnp.mean((out.astype(x_t.dtype) - target) ** 2)
            zero = jnp.zeros((), ddpm.dtype)
            return ddpm, {"ddpm": ddpm, "spatial": zero, "freq": zero}
        out, student_features = block_features(student, trainable["student"], x_t, time, **kwargs)
        _, teacher_features = block_features(teacher.model, frozen["teacher"], x_t, time,
                                             y=_conditioning(teacher.model, batch), train=False)
        teacher_features = jax.lax.stop_gradient(teacher_features)
        ddpm = jnp.mean((out.astype(x_t.dtype) - target) ** 2)
        spatial, freq = spectral_losses(teacher_features, student_features, trainable["proj"], batch["image"],
                                        alpha=alpha, eps=eps)
        return ddpm + lambda_s * spatial + lambda_f * freq, {"ddpm": ddpm, "spatial": spatial, "freq": freq}

    # the student has another architecture: its model section replaces the teacher's (no field may leak into it)
    output = {"model": dict(settings["student_model"])}
    frozen = {"teacher": teacher.params} if distil else {}
    return adaptation.student_program(config, teacher, init=init, loss=loss,
                                      student=lambda trainable: trainable["student"], frozen=frozen,
                                      metric_names=("ddpm", "spatial", "freq"), output=output,
                                      replace_output=("model",))


METHOD = Method(name="spectral_distill", build=build, validate=validate,
                doc="Spectral Diffusion: a slim (wavelet-gating) student from scratch + spectrum-aware distillation")
