"""The side network of Quantized Side Tuning (Zhang et al., ACL 2024) for a frozen diffusion backbone.

    side = init_side(key, backbone, variables, x, t, reduction=8)                  # the trainable pytree
    out = qst_apply(backbone, variables, side, x, t)                                  # [B, H, W, C]
    model = QSTModel(backbone_config, reduction=8)   # model kind "qst": model.apply({"params": {"backbone", "side"}}, x, t)

The backbone (a dpmjax UNet, the diffusers UNet port or a DiT) runs once, unchanged, on its own (frozen,
e.g. dequantised NF4) weights; flax method interception (``nn.intercept_methods``) reads each block's output
h_i (UNet: every ResBlock; DiT: every transformer block) and replaces the input of the output head (the
final GroupNorm / LayerNorm) -- no module is modified. With s_i = d_i / r channels (r = ``reduction``):

    h_side_i = side_block_i( (1 - sigmoid(z_i)) * down_i(h_i) + sigmoid(z_i) * bridge_i(h_side_{i-1}) )
    h_head   = (1 - sigmoid(z_out)) * up(h_side_L) + sigmoid(z_out) * h_L                  (QST, Sec. 3.2)
    out      = head(h_head)                          (the backbone's frozen GroupNorm / LayerNorm -> output layer)

down_i(h) = Norm(W2 swish(W1 h + b1) + b2), d_i -> ``adapter_dim`` (16) -> s_i: QST's low-rank downsampler
with the norm after it (the official ``AdapterLinear`` with ``add_layer_norm_after_adapter``); per-channel gates
z_i, z_out [s_i], [d] start at ``gate_init`` (0.5, QST's init). bridge_i resizes the side stream to block i's
spatial size (bilinear, antialiased: the UNet's levels) and, when s_{i-1} != s_i, maps the channels with a
learned 1x1 projection. side_block_i is a residual block of width s_i: h + Conv3x3(SiLU(Norm(h))) on feature
maps, h + W_b GELU(W_a Norm(h)) (ratio 4) on tokens. Norm normalises over every non-batch axis of a feature map
(GroupNorm with one group: widths of 2-4 channels at digit scale make per-channel statistics degenerate) and
over channels for tokens (LayerNorm).

Departures from the paper's code, and why: (a) ``up`` starts at zero. The heads of these networks begin with
a scale-invariant normalisation, so head(sigmoid(z_out) h_L) = head(h_L) up to the norm's epsilon: the QST
network starts as the teacher (like LoRA's B = 0), which few-shot adaptation needs; QST's LLM side network
starts from a random up-projection because its tasks replace the LM's output. (b) The side blocks are small
residual conv / MLP blocks, not full copies of the backbone's blocks (QST's side layers are decoder layers at
width d / r): at 8x8 and s_i = 2-4 an attention layer has nothing to attend over. (c) No dropout (10 shots).
(d) The backbone runs in eval mode (no dropout in it): it is frozen and receives no gradient.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

__all__ = ["BACKBONES", "backbone_spec", "feature_shapes", "init_side", "qst_apply", "QSTModel", "side_widths"]

# backbone class -> (the block class whose outputs feed the side network, the path of the output head's first
# module, whose input is replaced by the gated mix)
BACKBONES = {
    "UNet": ("ResBlock", ("norm_out",)),
    "DiffusersUNet2D": ("ResnetBlock2D", ("conv_norm_out",)),
    "DiT": ("DiTBlock", ("final_norm",)),
}


def backbone_spec(backbone) -> tuple:
    """(block class name, head path) of a supported backbone; ValueError naming the supported kinds otherwise."""
    name = type(backbone).__name__
    if name not in BACKBONES:
        raise ValueError(f"QST's side network reads the blocks of a UNet, the diffusers UNet port or a DiT "
                         f"(model kinds 'unet', 'diffusers_unet', 'dit'); {name} is not supported")
    return BACKBONES[name]


def _run(backbone, variables, x, t, y, context, on_block, on_head):
    """The backbone's forward (eval mode) with ``on_block(i, h_i)`` called on each block output and the head's
    input replaced by ``on_head(h_L)``."""
    block_class, head_path = backbone_spec(backbone)
    counter = [0]

    def interceptor(next_fun, args, kwargs, context_):
        if context_.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context_.module
        if type(module).__name__ == block_class:
            out = next_fun(*args, **kwargs)
            on_block(counter[0], out)
            counter[0] += 1
            return out
        if tuple(module.path) == head_path:
            (h, *rest) = args
            return next_fun(on_head(h).astype(h.dtype), *rest, **kwargs)
        return next_fun(*args, **kwargs)

    cond = {} if context is None else {"context": context}
    with nn.intercept_methods(interceptor):
        return backbone.apply(variables, x, t, y=y, train=False, **cond)


def feature_shapes(backbone, variables, x, t, y=None, context=None) -> tuple:
    """(shapes of the block outputs h_1..h_L, shape of the head's input h_L) for inputs like ``x`` (traced
    abstractly: nothing is computed)."""
    shapes, head = [], []

    def probe(variables, x, t):
        def on_head(h):
            head.append(tuple(h.shape))
            return h
        _run(backbone, variables, x, t, y, context, lambda i, h: shapes.append(tuple(h.shape)), on_head)
        return 0

    jax.eval_shape(probe, variables, x, t)
    if not shapes or not head:
        raise ValueError(f"QST found {len(shapes)} blocks and {len(head)} output heads in {type(backbone).__name__}")
    return tuple(shapes), head[0]


def side_widths(shapes, reduction: int) -> tuple:
    """s_i = d_i // r for the block widths d_i; ValueError when r exceeds a block's width."""
    widths = []
    for shape in shapes:
        if shape[-1] < reduction:
            raise ValueError(f"reduction={reduction} exceeds a block width of {shape[-1]} channels: the side network "
                             f"would have 0 channels there; use reduction <= {min(s[-1] for s in shapes)}")
        widths.append(shape[-1] // reduction)
    return tuple(widths)


def _dense(key, fan_in, fan_out):
    return {"kernel": jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in),
            "bias": jnp.zeros((fan_out,), jnp.float32)}


def init_side(key, backbone, variables, x, t, *, reduction: int = 8, adapter_dim: int = 16, gate_init: float = 0.5,
              y=None, context=None) -> dict:
    """The side network's params for ``backbone`` (see the module docstring; shapes from ``feature_shapes``)."""
    shapes, head_shape = feature_shapes(backbone, variables, x, t, y, context)
    widths = side_widths(shapes, reduction)
    keys = iter(jax.random.split(key, 4 * len(shapes) + 1))
    side = {}
    for i, (shape, width) in enumerate(zip(shapes, widths)):
        d = shape[-1]
        block = {"down_1": _dense(next(keys), d, adapter_dim), "down_2": _dense(next(keys), adapter_dim, width),
                 "down_norm": {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)},
                 "gate": jnp.full((width,), gate_init, jnp.float32),
                 "norm": {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}}
        if len(shape) == 4:
            block["conv"] = {"kernel": jax.random.normal(next(keys), (3, 3, width, width), jnp.float32)
                             / math.sqrt(9 * width), "bias": jnp.zeros((width,), jnp.float32)}
        else:
            block["mlp_in"] = _dense(next(keys), width, 4 * width)
            block["mlp_out"] = _dense(next(keys), 4 * width, width)
        if i > 0 and widths[i - 1] != width:
            block["bridge"] = _dense(next(keys), widths[i - 1], width)
        side[f"block_{i:02d}"] = block
    side["out"] = {"up": {"kernel": jnp.zeros((widths[-1], head_shape[-1]), jnp.float32),
                          "bias": jnp.zeros((head_shape[-1],), jnp.float32)},
                   "gate": jnp.full((head_shape[-1],), gate_init, jnp.float32)}
    return side


def _norm(h, params, eps=1e-5):
    """Normalise over every non-batch axis (feature maps [B, H, W, C]) or over channels (tokens [B, N, C])."""
    axes = tuple(range(1, h.ndim)) if h.ndim == 4 else (-1,)
    mean = jnp.mean(h, axis=axes, keepdims=True)
    var = jnp.var(h, axis=axes, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + eps) * params["scale"] + params["bias"]


def _apply_dense(h, params):
    return h @ params["kernel"] + params["bias"]


def _resize(h, shape):
    """The side stream at block i's spatial size (bilinear, antialiased when shrinking); tokens unchanged."""
    if h.ndim != 4 or h.shape[1:3] == tuple(shape[1:3]):
        return h
    return jax.image.resize(h, (h.shape[0], shape[1], shape[2], h.shape[-1]), method="linear")


def side_step(block: dict, feature, previous):
    """h_side_i from the backbone's block output ``feature`` (no gradient flows into it) and h_side_{i-1}."""
    feature = jax.lax.stop_gradient(feature).astype(jnp.float32)
    down = _norm(_apply_dense(nn.swish(_apply_dense(feature, block["down_1"])), block["down_2"]), block["down_norm"])
    if previous is None:
        mixed = down
    else:
        previous = _resize(previous, feature.shape)
        if "bridge" in block:
            previous = _apply_dense(previous, block["bridge"])
        gate = jax.nn.sigmoid(block["gate"])
        mixed = (1 - gate) * down + gate * previous
    h = nn.silu(_norm(mixed, block["norm"]))
    if "conv" in block:
        h = jax.lax.conv_general_dilated(h, block["conv"]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + block["conv"]["bias"]
    else:
        h = _apply_dense(nn.gelu(_apply_dense(h, block["mlp_in"]), approximate=True), block["mlp_out"])
    return mixed + h


def head_mix(out: dict, side_final, backbone_final):
    """(1 - sigmoid(z_out)) up(h_side_L) + sigmoid(z_out) h_L, the head's input (float32)."""
    backbone_final = jax.lax.stop_gradient(backbone_final).astype(jnp.float32)
    up = _apply_dense(_resize(side_final, backbone_final.shape), out["up"])
    gate = jax.nn.sigmoid(out["gate"])
    return (1 - gate) * up + gate * backbone_final


def qst_apply(backbone, variables, side, x, t, *, y=None, context=None, return_parts: bool = False):
    """The QST network's output for inputs (x, t[, y, context]) with the backbone on ``variables`` (its params
    wrapped in stop_gradient here: the backbone gets no gradient) and the side network on ``side``.

    ``return_parts=True`` also returns {"h_L": the backbone's head input, "h_side": the last side state,
    "h_head": the gated mix fed to the head} (for tests)."""
    variables = jax.lax.stop_gradient(variables)
    names = sorted(k for k in side if k.startswith("block_"))
    state = {"h_side": None}

    def on_block(i, h):
        if i >= len(names):
            raise ValueError(f"the backbone has more blocks than the side network ({len(names)}): the side params "
                             "were made for another network")
        state["h_side"] = side_step(side[names[i]], h, state["h_side"])

    def on_head(h):
        state["h_L"] = h
        state["h_head"] = head_mix(side["out"], state["h_side"], h)
        return state["h_head"]

    out = _run(backbone, variables, x, t, y, context, on_block, on_head)
    if return_parts:
        return out, {"h_L": state["h_L"], "h_side": state["h_side"], "h_head": state["h_head"]}
    return out


@dataclasses.dataclass(frozen=True)
class QSTModel:
    """Model kind ``"qst"`` (``dpmjax.nn.build_model``): a backbone (its config section without ``kind``'s
    ``qst_`` fields: ``backbone_kind`` plus the backbone's fields) and its side network, with the generative call
    signature ``apply({"params": {"backbone": ..., "side": ...}}, x, t, y=None, context=None, train=False)``.
    What ``dpmjax sample`` builds for a ``--method qst`` workdir; the backbone params it receives are the
    dequantised NF4 weights the side network was trained with."""

    backbone_config: tuple                  # sorted (field, value) items of the backbone's model section
    reduction: int = 8
    adapter_dim: int = 16
    gate_init: float = 0.5

    @classmethod
    def from_config(cls, config: dict) -> "QSTModel":
        config = dict(config)
        fields = {k[len("qst_"):]: config.pop(k) for k in list(config) if k.startswith("qst_")}
        kind = config.pop("backbone_kind", None)
        if kind is None or kind == "qst":
            raise ValueError(f"model kind 'qst' needs backbone_kind (unet, dit, diffusers_unet), got {kind!r}")
        items = tuple(sorted((k, _hashable(v)) for k, v in {"kind": kind, **config}.items()))
        return cls(backbone_config=items, **fields)

    @property
    def backbone(self):
        from dpmjax.nn import build_model

        return build_model({k: _listed(v) for k, v in self.backbone_config})

    @property
    def num_classes(self):
        return getattr(self.backbone, "num_classes", None)

    @property
    def param_dtype(self):
        return getattr(self.backbone, "param_dtype", jnp.float32)

    @property
    def dtype(self):
        return getattr(self.backbone, "dtype", jnp.float32)

    def init(self, key, x, t, y=None, context=None, train: bool = False):
        backbone = self.backbone
        k_backbone, k_side = jax.random.split(key)
        cond = {} if context is None else {"context": context}
        variables = backbone.init(k_backbone, x, t, y=y, **cond)
        side = init_side(k_side, backbone, variables, x, t, reduction=self.reduction, adapter_dim=self.adapter_dim,
                         gate_init=self.gate_init, y=y, context=context)
        return {"params": {"backbone": variables["params"], "side": side}}

    def apply(self, variables, x, t, y=None, context=None, train: bool = False, rngs=None):
        params = variables["params"]
        return qst_apply(self.backbone, {"params": params["backbone"]}, params["side"], x, t, y=y, context=context)

    def __call__(self, x, t, y=None, context=None, train: bool = False):  # the signature describe() inspects
        raise TypeError("QSTModel is not a flax module: call model.apply(variables, x, t, ...)")


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _listed(value):
    return list(value) if isinstance(value, tuple) else value
