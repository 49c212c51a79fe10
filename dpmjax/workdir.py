"""Loading a finished workdir for sampling: a training run's folder or one written by ``dpmjax convert``.

    model, variables, schedule, config = load_params("runs/digits")        # EMA params by default
    model_fn, schedule, config = load_for_sampling("runs/digits")          # the closure form model_fn(x, t)
    settings = sample_settings(load_config_of("runs/digits"))            # solver, nfe, spacing, guidance, num
    ems, path = load_workdir_ems("runs/digits", schedule)                  # newest DPM-Solver-v3 statistics

``config.train.target`` says what the network predicts ("eps", "x0" or "v"); ``config.sample`` holds the
workdir's sampling defaults (solver, nfe, spacing, guidance scale, num), ``WORKDIR/ems/*.npz`` the
DPM-Solver-v3 statistics ``dpmjax ems`` wrote. Everything here except ``load_params`` / ``load_for_sampling``
reads only small files (no checkpoint is restored), so callers can validate their arguments first.
"""
from __future__ import annotations

import os

import jax

from dpmjax.nn import build_model, init_params, make_model_fn
from dpmjax.schedules import schedule_from_config

__all__ = ["load_config_of", "load_params", "load_teacher", "load_for_sampling", "checkpoint_steps", "decode_if_latent",
           "SAMPLE_DEFAULTS", "sample_settings", "EMS_DIR", "ems_files", "load_workdir_ems", "compute_workdir_ems"]

# Sampling defaults for workdirs whose config.json lacks a ``sample`` section or some of its fields (folders
# written by ``dpmjax convert``, runs trained before the section existed). The same values as
# configs/common.py's ``SAMPLE`` (tests/test_config.py checks that they agree).
SAMPLE_DEFAULTS = dict(solver="dpmpp_2m", nfe=10, spacing="logSNR", guidance_scale=1.0, num=1000)
EMS_DIR = "ems"


def load_config_of(workdir: str):
    """The ``config.json`` a workdir was trained (or converted, or finetuned) with, as a ConfigDict
    (``dpmjax.train.resume.read_workdir_config``)."""
    from dpmjax.train.resume import read_workdir_config

    return read_workdir_config(workdir)


def load_params(workdir: str, *, step: int | None = None, use_ema: bool = True):
    """(model, variables, schedule, config) of a trained workdir (EMA params by default) or of a folder written
    by ``dpmjax convert`` (its only params), for callers that jit with the params as an argument."""
    from dpmjax.train import checkpoint, optim
    from dpmjax.train.state import create_train_state

    config = load_config_of(workdir)
    schedule = schedule_from_config(config.schedule)
    model = build_model(config.model)
    if config.get("method") is not None:  # written by `dpmjax finetune`: the method knows its state's layout
        from dpmjax.methods import load_student
        return model, load_student(config, workdir, step=step, use_ema=use_ema), schedule, config
    shape = tuple(config.data.image_shape)
    abstract_params = jax.eval_shape(lambda: init_params(model, shape, config.seed))
    pretrained = config.get("pretrained") is not None  # converted weights: {"params": ...} only
    if pretrained:
        template = {"params": abstract_params["params"]}
    else:
        tx = optim.make_optimizer(total_steps=config.train.num_steps, **dict(config.optim))
        template = jax.eval_shape(lambda p: create_train_state(p, tx, config.seed), abstract_params)
    mngr = checkpoint.manager(os.path.abspath(workdir))
    try:
        state, _ = checkpoint.restore(mngr, template, step)
    finally:
        mngr.close()
    if pretrained:
        return model, state, schedule, config
    return model, state.ema_params if use_ema else state.params, schedule, config


def load_teacher(workdir: str, *, step: int | None = None, use_ema: bool = True):
    """A trained (or converted, or finetuned) workdir as a frozen ``dpmjax.methods.Teacher`` (EMA weights)."""
    from dpmjax.methods.base import Teacher

    model, variables, schedule, config = load_params(workdir, step=step, use_ema=use_ema)
    return Teacher(model=model, params=variables, schedule=schedule, config=config,
                   workdir=os.path.abspath(workdir))


def load_for_sampling(workdir: str, *, step: int | None = None, use_ema: bool = True, y=None):
    """(model_fn(x, t), schedule, config) from a trained workdir, with EMA params by default, or from a folder
    written by ``dpmjax convert``. ``config.train.target`` is what model_fn predicts."""
    model, variables, schedule, config = load_params(workdir, step=step, use_ema=use_ema)
    return make_model_fn(model, variables, schedule, y=y), schedule, config


def decode_if_latent(config, samples):
    """``samples`` of a workdir decoded to images when its model is a latent one (``config.data.latent`` names
    the VAE workdir: ``dpmjax.data.latents.decode_latents``, D(z / s)); other workdirs' samples unchanged."""
    if config.data.get("latent") is None:
        return samples
    from dpmjax.data.latents import decode_latents

    return decode_latents(config, samples)


def checkpoint_steps(workdir: str) -> list[int]:
    """The checkpoint steps on disk (``WORKDIR/checkpoints/<step>``), ascending, without restoring anything.

    Raises FileNotFoundError naming the folder (and the command that fills it) when there is none.
    """
    folder = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(name) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if name.isdigit() and os.path.isdir(os.path.join(folder, name)))
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {folder} (train it with `dpmjax train --config ... --workdir "
                                f"{workdir}` first)")
    return steps


def sample_settings(config) -> dict:
    """{solver, nfe, spacing, guidance_scale, num}: the workdir's ``config.sample`` over ``SAMPLE_DEFAULTS``."""
    section = config.get("sample") or {}
    settings = dict(SAMPLE_DEFAULTS)
    settings.update({name: section[name] for name in SAMPLE_DEFAULTS if section.get(name) is not None})
    return settings


def ems_files(workdir: str) -> list[str]:
    """The DPM-Solver-v3 statistics files of a workdir (``WORKDIR/ems/*.npz``), newest first (by mtime)."""
    folder = os.path.join(os.path.abspath(workdir), EMS_DIR)
    paths = [os.path.join(folder, name) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
             if name.endswith(".npz") and os.path.isfile(os.path.join(folder, name))]
    return sorted(paths, key=lambda p: (os.path.getmtime(p), p), reverse=True)


def load_workdir_ems(workdir: str, schedule, path: str | None = None):
    """(EMS, path) for sampling ``workdir`` with ``dpm_solver_v3``: ``path`` if given, else the newest file of
    ``ems_files``; checked against ``schedule`` (``dpmjax.ems.load_ems``).

    Raises FileNotFoundError with the command that computes statistics when there are none, ValueError when
    the file does not fit the schedule.
    """
    from dpmjax.ems import load_ems

    if path is None:
        found = ems_files(workdir)
        if not found:
            raise FileNotFoundError(
                f"no DPM-Solver-v3 statistics in {os.path.join(os.path.abspath(workdir), EMS_DIR)}: compute them "
                f"with `dpmjax ems --workdir {workdir}` (or pass --ems FILE)")
        path = found[0]
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"EMS file {path} does not exist")
    return load_ems(path, schedule=schedule), path


def compute_workdir_ems(workdir: str, *, num_grid: int = 120, num_samples: int = 1024, t_start: float | None = None,
                        t_end: float | None = None, step: int | None = None, seed: int = 0, path: str | None = None,
                        **kwargs):
    """DPM-Solver-v3 statistics of a trained workdir (EMA weights) from ``num_samples`` training images, saved
    as ``WORKDIR/ems/ems_N{num_grid}_K{num_samples}.npz`` (or ``path``); returns (EMS, path).

    The call behind ``dpmjax ems``; ``load_workdir_ems`` finds the file again. A class-conditional model is
    measured unconditionally (the null class), as its unguided ODE. The model identity string records the
    workdir and step. Other keyword arguments go to ``dpmjax.ems.compute_ems`` (batch_size, num_probes,
    progress, ...).
    """
    import numpy as np

    from dpmjax.data import get_dataset
    from dpmjax.ems import compute_ems

    model_fn, schedule, config = load_for_sampling(workdir, step=step)
    source = get_dataset(config.data.name, "train", **dict(config.data.get("kwargs") or {}))
    order = np.random.default_rng(seed).permutation(len(source))[:num_samples]
    data = np.asarray(source.get_batch(np.sort(order))["image"], np.float32)
    ems = compute_ems(model_fn, schedule, data, t_start=t_start, t_end=t_end, num_grid=num_grid,
                      key=jax.random.key(seed), model_id=f"{os.path.abspath(workdir)}@step={step or 'latest'}",
                      prediction=str(config.train.get("target", "eps")), **kwargs)
    path = path or os.path.join(workdir, EMS_DIR, f"ems_N{num_grid}_K{len(data)}.npz")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ems.save(path)
    return ems, path
