"""One loop for every method: ``finetune(name, teacher, config, workdir)``.

    teacher = dpmjax.workdir.load_teacher("runs/digits")
    state = finetune("mmd_ddm", teacher, load_config("configs/methods/mmd_ddm.py"), "runs/digits_mmd")

It reuses the training infrastructure (``dpmjax.train``): the mesh and sharding rule (``config.train.sharding``
applies to the method state *and* to the frozen arrays), the jitted init with ``out_shardings``, orbax
checkpoints (atomic, fingerprinted, never non-finite; resume from the latest), the refusal of a resume whose
config changes the meaning of the checkpoint, metrics.jsonl / TensorBoard, the non-finite stop (every metric
and every leaf of the new state, checked inside the jitted step), SIGINT / SIGTERM saves and the progress bar
(``dpmjax.train.loop.run_steps``).

The output workdir's ``config.json`` is the teacher's model, schedule and data sections, the method's
sections (``method``, ``optim``, ``train``, ``data.batch_size``, ``seed``), the program's ``output`` (e.g. its
``sample`` settings) and a ``teacher`` section; ``dpmjax.workdir.load_params`` finds the student in it, so
``dpmjax sample`` / ``dpmjax eval`` load it like any workdir.

Config sections a method config (``configs/methods/NAME.py``) sets:
  method:  ``name`` and the method's hyperparameters (its module documents them);
  data:    ``batch_size`` (real images per update) and optionally ``name`` / ``kwargs`` (default: the
           teacher's dataset);
  optim:   ``dpmjax.train.optim.make_optimizer`` arguments of the method's optimizers;
  train:   num_steps, log_every, checkpoint_every, keep_checkpoints, sharding, ema_decay;
  sample:  (optional) overrides of the output workdir's sampling defaults;
  seed.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from dpmjax.methods.base import Program, Teacher, abstract_teacher, teacher_section
from dpmjax.sharding import data_sharding, make_mesh, replicated, sharding_rule
from dpmjax.train import checkpoint, resume
from dpmjax.train.loop import build_data, resume_or_init, run_steps, validate_train_config
from dpmjax.train.step import accumulate, init_metrics, tree_all_finite

__all__ = ["FinetuneState", "finetune", "validate_run", "make_finetune_step", "output_config", "load_student",
           "restore_method_state", "check_teacher", "frozen_of"]


@struct.dataclass
class FinetuneState:
    step: jax.Array     # [] int32: updates done
    key: jax.Array      # PRNG key data (uint32[2]); folded with the step for each update
    method: object      # the method's own state (``Program.init``)


def _section(config, name) -> dict:
    return json.loads(config[name].to_json()) if name in config and config[name] is not None else {}


def check_teacher(config, teacher: Teacher) -> None:
    """The teacher fits the config: its image shape equals the data's (when the config names another dataset),
    its params are finite. ValueError otherwise."""
    data = _section(config, "data")
    shape = data.get("image_shape")
    if shape is not None and tuple(shape) != teacher.image_shape:
        raise ValueError(f"the teacher ({teacher.workdir}) was trained on images of shape {teacher.image_shape}, "
                         f"but config.data.image_shape is {tuple(shape)}: use a teacher of that shape")
    teacher_data = teacher.config.data.get("name")
    if data.get("name") and data["name"] != teacher_data and shape is None:
        raise ValueError(f"config.data.name={data['name']!r} differs from the teacher's dataset "
                         f"{teacher_data!r}: also set config.data.image_shape to say the images fit "
                         f"the teacher's shape {teacher.image_shape}")


def output_config(method: str, config, teacher: Teacher, program: Program | None = None):
    """The locked ``config.json`` of a method's output workdir (see the module docstring)."""
    teacher_config = json.loads(teacher.config.to_json())
    data = dict(teacher_config["data"])
    data.update({k: v for k, v in _section(config, "data").items() if v is not None})
    train = {"target": teacher.prediction}
    train.update(_section(config, "train"))
    sample = dict(teacher_config.get("sample") or {})
    out = ml_collections.ConfigDict({
        "seed": int(config.get("seed", 0)), "model": teacher_config["model"], "schedule": teacher_config["schedule"],
        "data": data, "train": train, "optim": _section(config, "optim"), "sample": sample,
        "method": dict(_section(config, "method"), name=method), "teacher": teacher_section(teacher)})
    replace = set(program.replace_output) if program is not None else set()
    for name, fields in ((program.output if program is not None else {}) or {}).items():
        if isinstance(fields, dict) and name in out and hasattr(out[name], "keys") and name not in replace:
            out[name].update(fields)
        else:
            out[name] = fields
    if _section(config, "sample"):
        out.sample.update(_section(config, "sample"))
    out.lock()
    return out


def _method_config(config, name: str):
    """The config with ``method.name`` set (a config file may omit it or must agree with ``--method``)."""
    given = config.get("method", {}).get("name") if config.get("method") is not None else None
    if given not in (None, name):
        raise ValueError(f"the config is for method {given!r}, not {name!r} (pass --method {given} or the "
                         f"config of {name!r}: configs/methods/{name}.py)")
    return config


def validate_run(name: str, config, teacher: Teacher, *, num_devices: int | None = None, stop_after=None):
    """Every check ``finetune`` makes before anything is restored or compiled (``teacher`` may be abstract:
    ``abstract_teacher``); returns (method entry, mesh, sharding rule). ValueError naming the setting."""
    from dpmjax.methods import get_method

    entry = get_method(name)
    _method_config(config, name)
    mesh = make_mesh(num_devices)
    check_teacher(config, teacher)
    entry.validate(config, teacher)
    rule = validate_train_config(output_config(name, config, teacher), mesh, stop_after)
    return entry, mesh, rule


def finetune(name: str, teacher: Teacher, config, workdir: str, *, num_devices: int | None = None,
             quiet: bool = False, stop_after: int | None = None):
    """Run method ``name`` on ``teacher`` for ``config.train.num_steps`` updates in ``workdir`` (resuming).

    Raises ValueError for a bad setting or a teacher that does not fit (before anything compiles),
    ``resume.ConfigMismatchError`` for a config that may not resume the workdir, ``checkpoint.CheckpointError``
    for a corrupt checkpoint, ``FloatingPointError`` when the run diverges (the last finite checkpoint stays).
    Returns the final ``FinetuneState``.
    """
    from dpmjax.data import BatchIterator

    entry, mesh, rule = validate_run(name, config, teacher, num_devices=num_devices, stop_after=stop_after)
    program = entry.build(config, teacher)
    full = output_config(name, config, teacher, program)
    workdir = os.path.abspath(workdir)
    if teacher.workdir is not None and os.path.abspath(teacher.workdir) == workdir:
        raise ValueError(f"--workdir {workdir} is the teacher's workdir: write the finetuned model to another folder")
    os.makedirs(workdir, exist_ok=True)
    t = full.train
    mngr = checkpoint.manager(workdir, t.keep_checkpoints)
    writer = None
    try:
        latest = mngr.latest_step()
        previous = resume.check_resume_config(workdir, full, has_checkpoint=latest is not None)
        frozen_shardings = sharding_rule(rule, mesh, program.frozen)
        frozen = jax.device_put(program.frozen, frozen_shardings)
        seed = int(full.seed)

        def init_state(frozen):
            key = jax.random.key(seed)
            return FinetuneState(step=jnp.zeros((), jnp.int32), key=jax.random.key_data(key),
                                 method=program.init(frozen, jax.random.fold_in(key, 1 << 30)))

        abstract = jax.eval_shape(init_state, program.frozen)
        shardings = sharding_rule(rule, mesh, abstract)
        if program.needs_data:
            if not full.data.get("name"):
                raise ValueError(f"the teacher ({teacher.workdir}) records no dataset (a converted checkpoint) and "
                                 f"method {name!r} reads real data: set config.data.name (and data.image_shape)")
            source = build_data(full)
            if tuple(source.image_shape) != teacher.image_shape:
                raise ValueError(f"dataset {full.data.name!r} has images of shape {tuple(source.image_shape)}, the "
                                 f"teacher {teacher.image_shape}")
            batches = BatchIterator(source, full.data.batch_size, seed=seed, mesh=mesh,
                                    random_flip=full.data.get("random_flip", False))
        else:
            batches = _NoData()
        state, start, writer = resume_or_init(workdir, full, previous, mngr, latest, abstract, shardings, batches,
                                              lambda: jax.jit(init_state, out_shardings=shardings)(frozen))
        step_fn = make_finetune_step(program, mesh, shardings, frozen_shardings, needs_data=program.needs_data)
        return run_steps(full, state, lambda s, b, m: step_fn(s, b, frozen, m), batches, mngr, writer, start,
                         stop_after, quiet, init_metrics=step_fn.init_metrics)
    finally:
        if writer is not None:
            writer.close()
        mngr.wait_until_finished()
        mngr.close()


class _NoData:
    """The batch iterator of a method that reads no real data."""

    def __next__(self):
        return None

    def get_state(self):
        return {}

    def set_state(self, state):
        pass


def make_finetune_step(program: Program, mesh, state_shardings, frozen_shardings, *, needs_data: bool = True):
    """``step(state, batch, frozen, metrics) -> (state, metrics)``: the program's update jitted over ``mesh``,
    with the non-finite check of every metric and of the new state; state and metrics are donated."""
    names = tuple(program.metric_names)

    def step(state: FinetuneState, batch, frozen, metrics):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        method_state, scalars = program.update(state.method, batch, frozen, key)
        new = state.replace(step=state.step + 1, method=method_state)
        return new, accumulate(metrics, dict(scalars), tree_all_finite(method_state), new.step)

    repl = replicated(mesh)
    jitted = jax.jit(step, in_shardings=(state_shardings, data_sharding(mesh) if needs_data else None,
                                         frozen_shardings, repl),
                     out_shardings=(state_shardings, repl), donate_argnums=(0, 3))

    def fresh_metrics():  # committed like the step's output: one compilation (see dpmjax.train.step)
        return jax.device_put(init_metrics(names), repl)

    def finetune_step(state, batch, frozen, metrics=None):
        return jitted(state, batch, frozen, fresh_metrics() if metrics is None else metrics)

    finetune_step.jitted = jitted
    finetune_step.init_metrics = fresh_metrics
    return finetune_step


def restore_method_state(config, workdir: str, *, step: int | None = None):
    """(program, abstract teacher, the method's state) of a method workdir whose ``config.json`` is ``config``:
    the program is built on an abstract teacher (shapes only, from ``config.teacher``) to restore the
    checkpoint (verified, ``dpmjax.train.checkpoint``) at ``step`` (default the latest)."""
    from dpmjax.methods import get_method

    teacher = abstract_teacher(config.teacher)
    program = get_method(config.method.name).build(config, teacher)
    seed = int(config.seed)

    def init_state(frozen):
        key = jax.random.key(seed)
        return FinetuneState(step=jnp.zeros((), jnp.int32), key=jax.random.key_data(key),
                             method=program.init(frozen, key))

    abstract = jax.eval_shape(init_state, program.frozen)
    mngr = checkpoint.manager(os.path.abspath(workdir))
    try:
        state, _ = checkpoint.restore(mngr, abstract, step)
    finally:
        mngr.close()
    return program, teacher, state.method


def load_student(config, workdir: str, *, step: int | None = None, use_ema: bool = True):
    """The student's variables of a method workdir (its ``config.json`` read as ``config``); a program whose
    student reads the frozen teacher (``Program.student_reads_frozen``: LoRA, QST) loads the teacher's workdir
    recorded in ``config.teacher``."""
    program, _, method_state = restore_method_state(config, workdir, step=step)
    if not program.student_reads_frozen:
        return program.student(method_state, use_ema)
    return program.student(method_state, use_ema, frozen_of(config))


def frozen_of(config):
    """The frozen arrays of a method workdir's program, rebuilt on its real teacher (``config.teacher.workdir``)."""
    from dpmjax.methods import get_method
    from dpmjax.workdir import load_teacher

    where = config.teacher.get("workdir")
    if not where or not os.path.isdir(where):
        raise ValueError(f"method {config.method.name!r} stores only what it trained: its teacher's workdir "
                         f"{where!r} (config.json 'teacher') is needed to sample it and was not found")
    return get_method(config.method.name).build(config, load_teacher(where)).frozen
