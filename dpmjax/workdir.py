"""Loading a finished workdir for sampling: a training run's folder or one written by ``dpmjax convert``.

    model, variables, schedule, config = load_params("runs/digits")        # EMA params by default
    model_fn, schedule, config = load_for_sampling("runs/digits")          # the closure form model_fn(x, t)

``config.train.target`` says what the network predicts ("eps", "x0" or "v"); ``config.sample`` holds the
workdir's sampling defaults (solver, nfe, spacing, guidance scale).
"""
from __future__ import annotations

import json
import os

import jax

from dpmjax.nn import build_model, init_params, make_model_fn
from dpmjax.schedules import schedule_from_config

__all__ = ["load_config_of", "load_params", "load_for_sampling"]


def load_config_of(workdir: str):
    """The ``config.json`` a workdir was trained (or converted) with, as a ConfigDict."""
    import ml_collections

    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist (train one with `dpmjax train --config ... "
                                "--workdir ...` or convert one with `dpmjax convert`)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a dpmjax training workdir "
                                "(run `dpmjax train --config ... --workdir ...` first)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_params(workdir: str, *, step: int | None = None, use_ema: bool = True):
    """(model, variables, schedule, config) of a trained workdir (EMA params by default) or of a folder written
    by ``dpmjax convert`` (its only params), for callers that jit with the params as an argument."""
    from dpmjax.train import checkpoint, optim
    from dpmjax.train.state import create_train_state

    config = load_config_of(workdir)
    schedule = schedule_from_config(config.schedule)
    model = build_model(config.model)
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


def load_for_sampling(workdir: str, *, step: int | None = None, use_ema: bool = True, y=None):
    """(model_fn(x, t), schedule, config) from a trained workdir, with EMA params by default, or from a folder
    written by ``dpmjax convert``. ``config.train.target`` is what model_fn predicts."""
    model, variables, schedule, config = load_params(workdir, step=step, use_ema=use_ema)
    return make_model_fn(model, variables, schedule, y=y), schedule, config
