"""The shared core of the adaptation methods: train one pytree on the denoising loss of a (few-shot) target.

    program = student_program(config, teacher, init=..., loss=..., student=..., frozen=..., metric_names=(...))

Plain finetuning (``finetune``), DomainStudio, LoRA and Quantized Side Tuning differ only in *what* is trained
(all weights, low-rank adapters, a side network), *how* the network is assembled from it and the frozen
teacher, and which terms the loss adds; the optimizer step, the EMA, the metrics and the data contract are this
module's. Each update draws x_t = alpha_t x_0 + sigma_t eps for a batch of target images (``noised``) and
regresses the network on the teacher's own target (eps / x0 / v, ``config.train.target`` of the teacher):

    L(theta) = E_{t, eps} || f_theta(x_t, t) - target(x_0, eps, t) ||^2                 (Ho et al. 2020, eq. 14)

Config (every adaptation method): ``data.name`` / ``data.kwargs`` the target images (e.g. ``folder:DIR``),
``data.shots`` how many of them (the first ``shots``; fewer images in the folder is an error before anything
compiles), ``data.batch_size`` (at most ``shots``: a batch never repeats an image), ``optim`` and ``train`` as
for every method (``dpmjax.methods.loop``).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dpmjax.methods.base import Program, StudentState, Teacher
from dpmjax.train import losses, optim
from dpmjax.train.state import ema_decay_at, ema_update

__all__ = ["check_target_data", "training_apply_fn", "noised", "student_program", "make_optimizer", "adaptation_config"]


def check_target_data(config) -> None:
    """ValueError before anything compiles: ``data.shots`` larger than the target data, or a batch larger than
    the shots (the pipeline drops an epoch's incomplete batch, so a batch over ``shots`` would never fill)."""
    data = config.data
    shots = data.get("shots")
    if shots is None:
        return
    from dpmjax.train.loop import build_data

    if not data.get("name"):
        raise ValueError("config.data.shots is set but config.data.name names no target data")
    try:
        source = build_data(config)  # a folder is listed, not read; take_shots counts and reads `shots` images
    except FileNotFoundError as err:
        raise ValueError(f"config.data.name={data.name!r}: {err}") from None
    if int(data.batch_size) > len(source):
        raise ValueError(f"config.data.batch_size={data.batch_size} is larger than config.data.shots={shots}: a "
                         f"batch holds distinct target images; use batch_size <= {shots}")


def training_apply_fn(teacher: Teacher) -> Callable:
    """``apply(variables, x_t, t, y, key)`` of the teacher's module in training mode (dropout from ``key``), in the
    schedule's continuous time."""
    from dpmjax.nn import network_time

    model, schedule = teacher.model, teacher.schedule
    conditional = teacher.num_classes is not None

    def apply(variables, x_t, t, y, key):
        return model.apply(variables, x_t, network_time(schedule, t), y=y if conditional else None, train=True,
                           rngs={"dropout": key})

    return apply


def noised(batch, key, schedule, prediction: str):
    """(x_t, t, regression target) of a batch of clean images: t by ``losses.sample_times``, eps ~ N(0, I)."""
    x0 = batch["image"]
    k_t, k_noise = jax.random.split(key)
    t = losses.sample_times(k_t, x0.shape[0], schedule, x0.dtype)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    return losses.diffuse(x0, t, noise, schedule), t, losses.target_for(x0, noise, t, schedule, prediction)


def make_optimizer(config, **overrides) -> optax.GradientTransformation:
    """``dpmjax.train.optim.make_optimizer`` from ``config.optim`` (updated by ``overrides``) over
    ``config.train.num_steps``."""
    return optim.make_optimizer(total_steps=int(config.train.num_steps), **{**config.optim.to_dict(), **overrides})


def student_program(config, teacher: Teacher, *, init: Callable, loss: Callable, student: Callable, frozen,
                    metric_names=(), output=None, tx: optax.GradientTransformation | None = None,
                    optimizer_args: Callable | None = None, student_reads_frozen: bool = False,
                    replace_output: tuple = (), needs_data: bool = True) -> Program:
    """A ``Program`` that trains one pytree by gradient descent on ``loss``.

    Args:
      init: ``init(frozen, key) -> trainable`` (the pytree the optimizer updates).
      loss: ``loss(trainable, frozen, batch, key) -> (value, scalars)``; ``scalars`` named by ``metric_names``.
      student: ``student(trainable, frozen) -> variables`` of the output network (``student_reads_frozen``) or
        ``student(trainable) -> variables`` (the trainable pytree is the network: plain finetuning).
      frozen: what the update reads and never changes (``Program.frozen``).
      tx: the optimizer (default ``make_optimizer(config)``).
      replace_output: ``output`` sections that replace the teacher's whole (``Program.replace_output``).
      needs_data: False for a data-free loss (distillation from the teacher alone): ``batch`` is then None.
      optimizer_args: ``optimizer_args(frozen) -> dict`` of extra arguments of ``tx.update`` (AdamR's ``anchor``:
        the frozen teacher, ``dpmjax.train.adamr``).
    The update returns ``loss``'s scalars plus "loss" and "grad_norm"; the EMA follows ``train.ema_decay``.
    """
    tx = make_optimizer(config) if tx is None else tx
    ema_decay = float(config.train.get("ema_decay", 0.0))

    def init_state(frozen, key):
        trainable = init(frozen, key)
        return StudentState(step=jnp.zeros((), jnp.int32), params=trainable,
                            ema_params=jax.tree.map(jnp.copy, trainable), opt_state=tx.init(trainable))

    def update(state: StudentState, batch, frozen, key):
        (value, scalars), grads = jax.value_and_grad(loss, has_aux=True)(state.params, frozen, batch, key)
        extra = optimizer_args(frozen) if optimizer_args is not None else {}
        params, opt_state = optim.optimizer_step(tx, grads, state.opt_state, state.params, **extra)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
        new = StudentState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new, {"loss": value, **scalars, "grad_norm": optax.tree.norm(grads)}

    if student_reads_frozen:
        def student_fn(state: StudentState, use_ema: bool, frozen):
            return student(state.ema_params if use_ema else state.params, frozen)
    else:
        def student_fn(state: StudentState, use_ema: bool):
            return student(state.ema_params if use_ema else state.params)

    return Program(init=init_state, update=update, frozen=frozen, student=student_fn,
                   metric_names=("loss", *metric_names, "grad_norm"), output=dict(output or {}), needs_data=needs_data,
                   student_reads_frozen=student_reads_frozen, replace_output=tuple(replace_output))


def adaptation_config(method: str, arg=None, *, target: str = "style:digits:invert", steps: int = 300, **spec):
    """The unlocked config every adaptation method's ``configs/methods/<method>.py`` starts from, and the parsed
    variants: ``target=SPEC`` (dataset name of the target images, default the 10-shot inverted digits),
    ``shots=K``, ``steps=N``, ``runlocal`` (a 4-update smoke run) and the method's own ``spec``; ``target`` and
    ``steps`` give the variants' defaults.

    The defaults adapt the digits teacher (8x8): ``data.image_shape`` says the target images fit it, and a
    ``folder:`` target is read as 1-channel 8x8 images (``data.kwargs``; set both for another teacher); batch 8
    of the 10 shots; Adam 5e-4, constant, 300 updates, no EMA.
    """
    import ml_collections

    from dpmjax.config import parse_arg

    arg = parse_arg(arg, target=target, shots=10, steps=steps, runlocal=False, **spec)
    if arg.shots < 1:
        raise ValueError(f"variant shots={arg.shots}: the number of target images must be >= 1")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name=method)
    c.data = dict(name=arg.target, shots=arg.shots, batch_size=min(8, arg.shots), image_shape=(8, 8, 1))
    if arg.target.startswith("folder:"):  # your images, read in the teacher's channels and size
        c.data.kwargs = dict(channels=1, image_size=8)
    c.optim = dict(learning_rate=5e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=arg.steps, log_every=25, checkpoint_every=100, keep_checkpoints=2, sharding="replicate",
                   ema_decay=0.0)
    if arg.runlocal:
        c.data.batch_size = min(4, arg.shots)
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2)
    return c, arg
