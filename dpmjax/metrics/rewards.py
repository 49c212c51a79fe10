"""Rewards of generated images for reward finetuning (PRDP, DDPO, REINFORCE): black-box or differentiable.

    reward = jpeg_compressibility()                        # host code (PIL), not differentiable (DDPO's task)
    reward = classifier_reward(domain_metric("digits"))    # log p(label | x) of a frozen classifier, jittable
    reward = sum_rewards([(reward_a, 1.0), (reward_b, 0.5)])   # the multi-reward setting (PRDP Sec. 4.3)
    validate_reward(reward, image_shape=(8, 8, 1), num_classes=10)   # on a probe batch, before any compile
    r = reward.fn(reward.params, images, labels)           # [B] float32; inside jit, params as an argument

A ``Reward`` is ``fn(params, images [B, H, W, C] in [-1, 1], labels [B] int32) -> [B] float32`` plus its
frozen ``params`` (a classifier's variables, or None), so a jitted update takes them as an argument. Host
rewards (any numpy function) run through ``jax.pure_callback`` inside jitted code; each call checks the
returned shape and finiteness and raises naming the reward. ``differentiable`` says whether gradients flow
(a host reward has none: jax.pure_callback defines no derivative).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Reward", "RewardError", "host_reward", "jpeg_compressibility", "jpeg_incompressibility",
           "classifier_reward", "sum_rewards", "validate_reward", "to_uint8", "reward_from_spec", "REWARD_NAMES"]


class RewardError(ValueError):
    """A reward returned something other than one finite number per sample."""


@dataclasses.dataclass(frozen=True)
class Reward:
    """``fn(params, images, labels) -> [B] float32`` and its frozen ``params``; ``per_label``: it scores each
    sample against its own class (so the model must be class-conditional)."""

    name: str
    fn: Callable
    params: Any = None
    differentiable: bool = False
    per_label: bool = False

    def __call__(self, images, labels):
        return self.fn(self.params, images, labels)


def _check_values(name: str, values, batch: int) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (batch,):
        raise RewardError(f"reward {name!r} must return one number per sample, shape ({batch},); got shape "
                          f"{values.shape}")
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise RewardError(f"reward {name!r} must return real numbers, got dtype {values.dtype}")
    if not np.all(np.isfinite(values)):
        bad = np.flatnonzero(~np.isfinite(values))[:8].tolist()
        raise RewardError(f"reward {name!r} returned NaN or inf for samples {bad}")
    return values.astype(np.float32)


def host_reward(name: str, fn: Callable[[np.ndarray, np.ndarray], Any]) -> Reward:
    """A black-box reward: ``fn(images float32 [B, H, W, C] in [-1, 1], labels int32 [B]) -> [B]`` on the host
    (numpy, PIL, any library), callable inside jitted code through ``jax.pure_callback``."""
    def on_host(images, labels):
        images, labels = np.asarray(images), np.asarray(labels)
        return _check_values(name, fn(images, labels), images.shape[0])

    def reward_fn(params, images, labels):
        del params
        out = jax.ShapeDtypeStruct((images.shape[0],), jnp.float32)
        return jax.pure_callback(on_host, out, images, jnp.asarray(labels, jnp.int32), vmap_method="sequential")

    return Reward(name=name, fn=reward_fn, params=None, differentiable=False)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 pixels (round to nearest, clipped), as images are saved."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _jpeg_kilobytes(images, quality: int) -> np.ndarray:
    from PIL import Image

    sizes = []
    for image in to_uint8(images):
        buffer = io.BytesIO()
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return np.asarray(sizes, np.float32)


def jpeg_compressibility(quality: int = 95) -> Reward:
    """-(JPEG file size in kB) at ``quality`` (DDPO, Black et al. 2023, Sec. 6.1: images that compress well;
    PIL, quality 95 as its official code)."""
    return host_reward("jpeg_compressibility", lambda images, labels: -_jpeg_kilobytes(images, quality))


def jpeg_incompressibility(quality: int = 95) -> Reward:
    """+(JPEG file size in kB): detailed, high-frequency images (DDPO's incompressibility task)."""
    return host_reward("jpeg_incompressibility", lambda images, labels: _jpeg_kilobytes(images, quality))


def brightness() -> Reward:
    """The mean intensity of each image in [0, 1] ((x + 1) / 2 averaged over pixels and channels): for digits,
    the amount of ink. Jitted and differentiable; trivially hackable (a white image scores 1), which makes it the
    test case of the reward-hacking check (does the sample still show its class?) and of multi-reward
    finetuning (``brightness + classifier:digits:label``)."""

    def reward_fn(params, images, labels):
        del params, labels
        return jnp.mean((images.astype(jnp.float32) + 1.0) / 2.0, axis=tuple(range(1, images.ndim)))

    return Reward(name="brightness", fn=reward_fn, params=(), differentiable=True)


def classifier_reward(metric, target: int | None = None, *, kind: str = "log_prob", shift: int = 0) -> Reward:
    """A frozen classifier's belief in a class: ``log p(c | x)`` (kind "log_prob") or ``p(c | x)`` ("prob"),
    with c = ``target`` for every sample, or, when ``target`` is None, the sample's own label plus ``shift``
    (mod the classes): shift 0 rewards images that look like their class, shift 1 ("next") like the following
    class, a per-prompt task with headroom for a class-conditional model that already draws its classes well.
    ``metric`` is a ``dpmjax.metrics.domain.DomainMetric`` (its params become the reward's, an argument of jitted
    code). Differentiable."""
    if kind not in ("log_prob", "prob"):
        raise ValueError(f"kind must be 'log_prob' or 'prob', got {kind!r}")
    module = metric.module
    num_classes = module.num_classes
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, np.integer))
                               or not 0 <= target < num_classes):
        raise ValueError(f"target must be a class in [0, {num_classes}), got {target!r}")

    def reward_fn(params, images, labels):
        logits = module.apply(params, images.astype(jnp.float32))
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        classes = (jnp.full(images.shape[:1], target, jnp.int32) if target is not None
                   else (labels.astype(jnp.int32) + shift) % num_classes)
        chosen = jnp.take_along_axis(log_p, classes[:, None], axis=-1)[:, 0]
        return chosen if kind == "log_prob" else jnp.exp(chosen)

    if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)) or (shift and target is not None):
        raise ValueError(f"shift must be an integer, applied to the sample's own label (target None), got {shift!r}")
    own = "label" if shift == 0 else "next" if shift == 1 else f"label+{shift}"
    name = f"classifier_{kind}:{metric.dataset}:" + (own if target is None else str(target))
    return Reward(name=name, fn=reward_fn, params=metric.params, differentiable=True, per_label=target is None)


def sum_rewards(terms: Sequence[tuple[Reward, float]]) -> Reward:
    """sum_i w_i r_i (PRDP's multi-reward finetuning); differentiable when every term is."""
    terms = list(terms)
    if not terms:
        raise ValueError("sum_rewards needs at least one (reward, weight) pair")
    for reward, weight in terms:
        if not isinstance(reward, Reward) or isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not np.isfinite(weight):
            raise ValueError(f"sum_rewards takes (Reward, finite weight) pairs, got ({reward!r}, {weight!r})")
    weights = [float(w) for _, w in terms]
    fns = [r.fn for r, _ in terms]

    def reward_fn(params, images, labels):
        return sum(w * fn(p, images, labels).astype(jnp.float32) for w, fn, p in zip(weights, fns, params))

    return Reward(name=" + ".join(f"{w:g} {r.name}" for r, w in terms), fn=reward_fn,
                  params=tuple(r.params for r, _ in terms), differentiable=all(r.differentiable for r, _ in terms),
                  per_label=any(r.per_label for r, _ in terms))


def check_conditioning(reward: Reward, spec, num_classes: int | None) -> None:
    """ValueError when ``reward`` scores each sample against its own class (``label``, ``next``) but the model is
    unconditional (``num_classes`` None): its samples have no class."""
    if num_classes is None and reward.per_label:
        raise ValueError(f"config.method.reward {spec!r} scores each sample against its own class, but the teacher "
                         f"is unconditional: give a target class (classifier:DATASET:TARGET)")


def validate_reward(reward: Reward, image_shape, num_classes: int | None = None, *, batch: int = 3) -> None:
    """Call ``reward`` once, eagerly, on a probe batch (a black, a white and a random image of ``image_shape``)
    and raise ``RewardError`` unless it returns one finite real number per sample: run before compiling."""
    if not isinstance(reward, Reward):
        raise RewardError(f"expected a dpmjax.metrics.rewards.Reward, got {type(reward).__name__}")
    shape = tuple(int(n) for n in image_shape)
    rng = np.random.default_rng(0)
    probe = np.stack([np.full(shape, -1.0), np.full(shape, 1.0)]
                     + [rng.uniform(-1, 1, shape) for _ in range(batch - 2)]).astype(np.float32)
    labels = np.arange(batch, dtype=np.int32) % max(int(num_classes or 1), 1)
    try:
        values = reward(jnp.asarray(probe), jnp.asarray(labels))
    except RewardError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported with the reward's name
        raise RewardError(f"reward {reward.name!r} failed on a probe batch of shape {probe.shape}: "
                          f"{type(err).__name__}: {err}") from err
    _check_values(reward.name, values, batch)


REWARD_NAMES = ("jpeg_compressibility", "jpeg_incompressibility", "brightness",
                "classifier:DATASET[:TARGET|label|next][:prob]")


def reward_from_spec(spec: str, *, image_shape=None) -> Reward:
    """A reward from a config string: terms joined by ``+``, each ``[WEIGHT*]NAME`` with NAME one of
    ``REWARD_NAMES``, e.g. ``"jpeg_incompressibility"``, ``"classifier:digits:3"`` (log p(3 | x) of the cached
    seed-0 digits classifier), ``"classifier:digits:label"`` (each sample's own class),
    ``"classifier:digits:next:prob"`` (p of the class after the sample's own),
    ``"0.5*classifier:digits:label + 0.1*jpeg_compressibility"``. ``image_shape`` (if given) must be the
    classifier dataset's."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward must be a non-empty string of {REWARD_NAMES}, got {spec!r}")
    terms = []
    for term in spec.split("+"):
        weight_text, _, name = term.strip().rpartition("*")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(f"reward term {term.strip()!r}: the weight {weight_text!r} is not a number") from None
        terms.append((_single_reward(name.strip(), image_shape), weight))
    return terms[0][0] if len(terms) == 1 and terms[0][1] == 1.0 else sum_rewards(terms)


def _single_reward(name: str, image_shape) -> Reward:
    if name == "jpeg_compressibility":
        return jpeg_compressibility()
    if name == "jpeg_incompressibility":
        return jpeg_incompressibility()
    if name == "brightness":
        return brightness()
    parts = name.split(":")
    if parts[0] == "classifier" and 2 <= len(parts) <= 4:
        from dpmjax.metrics.domain import CONFIGS, domain_metric

        dataset, rest = parts[1], parts[2:]
        kind = "prob" if rest and rest[-1] == "prob" else "log_prob"
        rest = rest[:-1] if kind == "prob" else rest
        if dataset not in CONFIGS:
            raise ValueError(f"reward {name!r}: classifier datasets are {tuple(CONFIGS)}, got {dataset!r}")
        target, shift = None, 0
        if rest and rest[0] == "next":
            shift = 1
        elif rest and rest[0] != "label":
            if not rest[0].isdigit():
                raise ValueError(f"reward {name!r}: the target must be a class number, 'label' or 'next', got "
                                 f"{rest[0]!r}")
            target = int(rest[0])
        metric = domain_metric(dataset)
        if image_shape is not None:
            from dpmjax.data import get_dataset

            expected = tuple(get_dataset(dataset, "test").image_shape)
            if tuple(image_shape) != expected:
                raise ValueError(f"reward {name!r}: the {dataset} classifier reads images of shape {expected}, the "
                                 f"model makes {tuple(image_shape)}")
        return classifier_reward(metric, target, kind=kind, shift=shift)
    raise ValueError(f"unknown reward {name!r}; choose from {REWARD_NAMES}")
