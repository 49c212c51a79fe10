"""Flax linen networks: an ADM-style UNet, a DiT, a small classifier, and the bridge to the samplers.

Generative networks share one call signature,
``module.apply(variables, x [B, H, W, C], t [B], y=None, context=None, train=False) -> [B, H, W, C]``,
with ``t`` the float timestep on the ~[0, 1000] scale of the sinusoidal embedding. ``make_model_fn`` turns a
module and its parameters into the sampler contract ``model_fn(x, t)`` in the schedule's continuous time.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from dpmjax.nn.classifier import Classifier
from dpmjax.nn.dit import DiT
from dpmjax.nn.layers import drop_labels, timestep_embedding
from dpmjax.nn.unet import UNet
from dpmjax.parameterization import classifier_free_guidance, expand_like

__all__ = ["UNet", "DiT", "Classifier", "drop_labels", "timestep_embedding", "count_params", "describe",
           "init_variables", "network_time", "make_model_fn", "make_cfg_model_fn", "make_apply_fn",
           "make_cfg_apply_fn", "build_model", "init_params", "MODEL_KINDS"]

MODEL_KINDS = ("unet", "dit", "diffusers_unet", "qst", "vae", "deblur_unet")


def build_model(model_config):
    """The Flax module of a config's ``model`` section (``kind`` plus the module's fields; ``bfloat16`` sets
    the compute dtype)."""
    kwargs = dict(model_config)
    kind = kwargs.pop("kind", None)
    if kind == "qst":  # a frozen backbone and its QST side network (dpmjax.nn.side; written by `--method qst`)
        from dpmjax.nn.side import QSTModel
        return QSTModel.from_config(kwargs)
    kwargs["dtype"] = jnp.bfloat16 if kwargs.pop("bfloat16", False) else jnp.float32
    if kind == "deblur_unet":  # image-conditioned / guided deblurring UNet (dpmjax.nn.deblur, dpmjax.methods.deblur)
        from dpmjax.nn.deblur import DeblurUNet
        return DeblurUNet(**kwargs)
    if kind == "unet":
        model = UNet(**kwargs)
        model.check_conditioning()
        return model
    if kind == "dit":
        return DiT(**kwargs)
    if kind == "vae":  # the KL autoencoder of latent diffusion (dpmjax.nn.vae; `config.train.objective="vae"`)
        from dpmjax.nn.vae import VAE
        kwargs["channels"], kwargs["image_shape"] = tuple(kwargs["channels"]), tuple(kwargs["image_shape"])
        return VAE(**kwargs)
    if kind == "diffusers_unet":  # `dpmjax convert --from-diffusers` (dpmjax.convert)
        from dpmjax.nn.diffusers_unet import DiffusersUNet2D
        return DiffusersUNet2D.from_config(kwargs)
    raise ValueError(f"config.model.kind must be one of {MODEL_KINDS}, got {kind!r}")


def init_params(model, image_shape, seed: int):
    """``model.init`` variables for images of ``image_shape`` [H, W, C] (labels when the model has classes).

    rbg keys compile ``model.init`` several times faster than threefry on CPU (init only; training keys use
    the default implementation).
    """
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if getattr(model, "num_classes", None) else None
    return jax.jit(model.init)(jax.random.key(seed, impl="rbg"), x, jnp.zeros((1,)), y=y)


def count_params(params) -> int:
    """Number of scalars in a parameter pytree (arrays or ``jax.ShapeDtypeStruct``s)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def _as_variables(params) -> Mapping[str, Any]:
    """Accept either the full variables dict ``{"params": ...}`` that ``init`` returns or its "params" entry."""
    if isinstance(params, Mapping) and "params" in params:
        return params
    return {"params": params}


def _example_inputs(model, input_shape, context_len: int):
    """Zero inputs for ``model.init``: x, plus t for generative models, plus context where it cross-attends
    (and a negative context for a SpeedUpNet adapter; a model whose labels are its sequence needs neither)."""
    x = jnp.zeros(input_shape, jnp.float32)
    args, kwargs = (x,), {}
    if "t" in inspect.signature(type(model).__call__).parameters:
        args = (x, jnp.zeros(input_shape[:1], jnp.float32))
    if getattr(model, "context_dim", None) is not None and not getattr(model, "label_tokens", 0):
        kwargs["context"] = jnp.zeros((input_shape[0], context_len, model.context_dim), jnp.float32)
        if getattr(model, "negative_adapter", False):
            kwargs["negative_context"] = kwargs["context"]
    return args, kwargs


def init_variables(model, key, input_shape, *, context_len: int = 1):
    """``model.init`` on zero inputs of ``input_shape`` [B, H, W, C], jitted (one compiled program).

    Tip for CPUs: initialisation compiles one random-bits program per parameter; with jax's default
    partitionable threefry keys that dominates the time, and ``jax.random.key(seed, impl="rbg")`` keys
    compile several times faster (they give different, equally valid, initial values).
    """
    args, kwargs = _example_inputs(model, tuple(int(n) for n in input_shape), context_len)
    return jax.jit(lambda k: model.init(k, *args, **kwargs))(key)


def describe(model, input_shape, *, context_len: int = 1) -> str:
    """A short report of ``model``'s parameter count for inputs of ``input_shape`` [B, H, W, C].

    Parameters are built abstractly (``jax.eval_shape``): nothing is computed. Models with a ``t`` argument
    are given one; a model with ``context_dim`` gets a context of ``context_len`` tokens.
    """
    input_shape = tuple(int(n) for n in input_shape)
    args, kwargs = _example_inputs(model, input_shape, context_len)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"]
    lines = [f"{type(model).__name__} for input {list(input_shape)}: {count_params(params):,} parameters "
             f"(params {jnp.dtype(model.param_dtype).name}, compute "
             f"{jnp.dtype(model.dtype or jnp.float32).name})"]
    width = max((len(name) for name in params), default=0)
    lines += [f"  {name:<{width}}  {count_params(sub):>10,}" for name, sub in params.items()]
    return "\n".join(lines)


def network_time(schedule, t):
    """The network's time input for continuous time ``t`` of ``schedule``.

    DiscreteVP: ``schedule.timestep_of_t(t)`` = 1000 (t - 1/N), so label n <-> t = (n + 1) / N (the official
    DPM-Solver ``model_wrapper``); continuous schedules (LinearVP, CosineVP, FlowMatching): 1000 t.
    """
    if hasattr(schedule, "timestep_of_t"):
        return schedule.timestep_of_t(t)
    return 1000.0 * jnp.asarray(t)


def _labels(y, batch):
    return None if y is None else jnp.broadcast_to(jnp.asarray(y), (batch,))


def make_apply_fn(module, schedule) -> Callable:
    """``apply_fn(params, x, t, **cond)``: the params-as-arguments model contract of samplers, adjoint and methods.

    ``t`` [B] is continuous time of ``schedule`` (fed to the network as ``network_time(schedule, t)``);
    ``params`` the variables ``{"params": ...}`` or the params tree alone; ``cond`` per-sample conditioning
    (``y`` [B] class labels, ``context`` [B, L, D]); train=False.
    """
    def apply_fn(params, x, t, **cond):
        return module.apply(_as_variables(params), x, network_time(schedule, t), train=False, **cond)

    return apply_fn


def make_cfg_apply_fn(module, schedule, guidance_scale, *, num_classes: int | None = None) -> Callable:
    """Classifier-free guided ``apply_fn(params, x, t, y)``: out_u + s (out_c - out_u) (Ho & Salimans 2022,
    eq. 6), both halves as one batch of 2B (one NFE); the unconditional half uses the null class
    ``num_classes`` (default ``module.num_classes``). ``guidance_scale`` may be a Python float or a traced
    scalar / [B] array (then one compiled program serves every scale); a Python 1.0 (the conditional model) or
    0.0 (the unconditional one) runs one batch of B instead of 2B."""
    null_label = module.num_classes if num_classes is None else num_classes
    if null_label is None:
        raise ValueError("make_cfg_apply_fn needs a class-conditional module (num_classes set) or num_classes=")
    plain = make_apply_fn(module, schedule)
    if isinstance(guidance_scale, (int, float)) and guidance_scale in (0.0, 1.0):
        if guidance_scale == 1.0:
            return lambda params, x, t, y: plain(params, x, t, y=_labels(y, x.shape[0]))
        return lambda params, x, t, y: plain(params, x, t, y=jnp.full((x.shape[0],), null_label, jnp.int32))

    def apply_fn(params, x, t, y):
        batch = x.shape[0]
        labels = _labels(y, batch)
        both = module.apply(_as_variables(params), jnp.concatenate([x, x]),
                            network_time(schedule, jnp.concatenate([t, t])),
                            y=jnp.concatenate([jnp.full_like(labels, null_label), labels]), train=False)
        out_u, out_c = both[:batch], both[batch:]
        scale = jnp.asarray(guidance_scale, out_u.dtype)
        return out_u + expand_like(scale, out_u) * (out_c - out_u)

    return apply_fn


def make_model_fn(module, params, schedule, y=None, context=None) -> Callable:
    """``model_fn(x, t)`` for ``dpmjax.sample``: the network at ``network_time(schedule, t)``, train=False.

    Args:
      module: a UNet or DiT (anything with the shared generative call signature).
      params: its variables ``{"params": ...}`` or the params tree alone.
      schedule: the schedule the network was trained on (fixes the time input, see ``network_time``).
      y: class labels, a scalar or [B] ints (None: unconditional / null class).
      context: a conditioning sequence [B, L, D] for cross-attention.
    Returns:
      model_fn(x [B, ...], t [B]) -> the network output, in x's dtype (what it predicts is the training choice).
    """
    variables = _as_variables(params)

    def model_fn(x, t):
        return module.apply(variables, x, network_time(schedule, t), y=_labels(y, x.shape[0]), context=context,
                            train=False)

    return model_fn


def make_cfg_model_fn(module, params, schedule, y, guidance_scale: float, *, context=None, null_context=None,
                      num_classes: int | None = None) -> Callable:
    """Classifier-free guided ``model_fn(x, t)``: out_u + s (out_c - out_u) (Ho & Salimans 2022, eq. 6).

    The conditional half uses labels ``y`` (and ``context``), the unconditional half the null class
    ``num_classes`` (default ``module.num_classes``) and ``null_context``. Both halves run as one batch of
    2B, one model call (``dpmjax.parameterization.classifier_free_guidance``); s = 1 runs the conditional
    half only. Guidance mixes raw outputs, which is exact for eps, x0 and v predictions alike (affine in the
    output at fixed x, t).
    """
    null_label = module.num_classes if num_classes is None else num_classes
    if null_label is None:
        raise ValueError("make_cfg_model_fn needs a class-conditional module (num_classes set) or num_classes=")
    if y is None:
        raise ValueError("make_cfg_model_fn needs labels y to guide towards")
    if (context is None) != (null_context is None):
        raise ValueError("give both context and null_context (the unconditional sequence) or neither")
    variables = _as_variables(params)

    def net(x, t, cond):
        return module.apply(variables, x, network_time(schedule, t), y=cond["y"], context=cond["context"],
                            train=False)

    def guided(x, t):
        batch = x.shape[0]
        labels = _labels(y, batch)
        cond = {"y": labels, "context": context}
        uncond = {"y": jnp.full_like(labels, null_label), "context": null_context}
        return classifier_free_guidance(net, guidance_scale, cond, uncond)(x, t)

    return guided
