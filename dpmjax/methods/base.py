"""The contract of a finetuning / distillation method: a few pure functions on a frozen teacher.

    teacher = Teacher(model, variables, schedule, config)          # dpmjax.workdir.load_teacher(WORKDIR)
    program = get_method("mmd_ddm").build(config, teacher)          # host side: cheap, no computation
    state = program.init(frozen, key)                               # pure: the method's own state
    state, scalars = program.update(state, batch, frozen, key)      # pure: one update (the loop jits and shards)
    variables = program.student(state, use_ema=True)                # the network the output workdir samples

Everything the update reads but never changes -- the teacher's params, a feature network's params, a target
set -- is in ``program.frozen`` and reaches the jitted update as an argument (never a trace constant): a
frozen pytree of another checkpoint with the same shapes reuses the compiled program. ``build`` must work
when the teacher's params are ``jax.ShapeDtypeStruct``s (``abstract_teacher``): loading a finished method
workdir builds the program only to know the shapes of its state.

``dpmjax.methods.loop.finetune`` runs any method: mesh and sharding rule, orbax checkpoints with resume,
metrics.jsonl / TensorBoard, the non-finite stop and the progress bar of the training loop
(``dpmjax.train.loop.run_steps``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import struct

__all__ = ["Teacher", "Program", "Method", "StudentState", "abstract_teacher", "teacher_section", "method_settings"]


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A trained diffusion model, frozen: module, variables ``{"params": ...}``, schedule and its config."""

    model: Any
    params: Any
    schedule: Any
    config: Any
    workdir: str | None = None

    @property
    def prediction(self) -> str:
        """What the network predicts: "eps", "x0" or "v" (its ``config.train.target``)."""
        return str(self.config.train.get("target", "eps"))

    @property
    def image_shape(self) -> tuple:
        return tuple(int(n) for n in self.config.data.image_shape)

    @property
    def num_classes(self):
        return getattr(self.model, "num_classes", None)

    def apply_fn(self) -> Callable:
        """``apply_fn(params, x, t, **cond)`` in the schedule's continuous time (``dpmjax.nn.make_apply_fn``)."""
        from dpmjax.nn import make_apply_fn

        return make_apply_fn(self.model, self.schedule)


@struct.dataclass
class StudentState:
    """The state of a method that trains one network: its params, their EMA and the optimizer's state."""

    step: jax.Array      # [] int32: updates done (the EMA warm-up)
    params: Any          # the network being finetuned
    ema_params: Any      # its EMA (``train.ema_decay``; 0 keeps the latest params)
    opt_state: Any


def method_settings(config, defaults: dict) -> dict:
    """``defaults`` updated by the config's ``method`` section (all of it but ``name``)."""
    given = config.method.to_dict() if hasattr(config.method, "to_dict") else dict(config.method)
    return {**defaults, **{k: v for k, v in given.items() if k != "name"}}


def teacher_section(teacher: Teacher) -> dict:
    """What an output workdir records of its teacher: where it was and what it was (model, schedule, data,
    target), enough to rebuild the shapes of a method's state without the teacher's files."""
    import json

    config = json.loads(teacher.config.to_json())
    return {"workdir": teacher.workdir, "model": config["model"], "schedule": config["schedule"],
            "data": config["data"], "target": teacher.prediction, "seed": int(config.get("seed", 0))}


def abstract_teacher(section) -> Teacher:
    """A ``Teacher`` with ``jax.ShapeDtypeStruct`` params from a workdir's ``teacher`` section."""
    import ml_collections

    from dpmjax.nn import build_model, init_params
    from dpmjax.schedules import schedule_from_config

    config = ml_collections.ConfigDict({"model": dict(section["model"]), "schedule": dict(section["schedule"]),
                                        "data": dict(section["data"]), "train": {"target": section["target"]},
                                        "seed": int(section.get("seed", 0))})
    model = build_model(config.model)
    shape = tuple(config.data.image_shape)
    params = jax.eval_shape(lambda: init_params(model, shape, config.seed))
    return Teacher(model=model, params=params, schedule=schedule_from_config(config.schedule), config=config,
                   workdir=section.get("workdir"))


@dataclasses.dataclass(frozen=True)
class Program:
    """A method built for one config and teacher: pure functions and the frozen arrays they read.

    Attributes:
      init: ``init(frozen, key) -> state``, the method's state (a pytree of arrays: student params and EMA,
        optimizer states, ...). The loop runs it under ``jax.jit`` with the state's shardings.
      update: ``update(state, batch, frozen, key) -> (state, scalars)``, one step; ``batch`` is
        ``{"image": [B, H, W, C], "label": [B]}`` of real data (``None`` when ``needs_data`` is False),
        ``scalars`` a dict of [] arrays named by ``metric_names`` (logged as their means between log steps;
        any non-finite value stops the run before anything is saved).
      frozen: the pytree the update reads and never changes (teacher params, feature-network params, ...).
      student: ``student(state, use_ema) -> variables`` of the output network (what ``dpmjax sample`` runs).
      metric_names: the names of ``update``'s scalars.
      output: config sections of the output workdir over the teacher's, e.g. ``{"sample": {...}}`` (the
        settings ``dpmjax sample`` uses) or ``{"train": {"target": "x0"}}`` when the student predicts another
        quantity than the teacher; each updates the teacher's section of that name, except those named in
        ``replace_output``, which replace it whole (a student of another architecture: ``{"model": {...}}``
        must not inherit the teacher's model fields).
      needs_data: whether ``update`` reads real batches.
      student_reads_frozen: ``student`` is ``student(state, use_ema, frozen)``: the output network is made of the
        state *and* the frozen teacher (LoRA adapters merged into the teacher's weights, a side network beside
        the quantised teacher), so a checkpoint stores only what was trained; ``load_student`` then loads the
        teacher from ``config.teacher.workdir``.
    """

    init: Callable
    update: Callable
    frozen: Any
    student: Callable
    metric_names: tuple
    output: dict = dataclasses.field(default_factory=dict)
    needs_data: bool = True
    student_reads_frozen: bool = False
    replace_output: tuple = ()


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: ``build(config, teacher) -> Program`` and ``validate(config, teacher)``.

    ``validate`` raises ``ValueError`` naming the setting for anything ``build`` or the run would fail on
    (before anything is restored or compiled); ``doc`` is one line for ``dpmjax finetune --help``.
    ``sample_workdir`` (optional): ``sample_workdir(workdir, num, *, seed, solver, nfe, spacing, batch_size) ->
    images [num, H, W, C]`` for a method whose output is not sampled by a registered solver from pure noise alone
    (DPM-OT maps the noise first); ``dpmjax sample`` calls it for that method's workdirs.
    """

    name: str
    build: Callable
    validate: Callable
    doc: str
    sample_workdir: Callable | None = None
