"""The training loop: config -> model, data, sharded step, checkpoints, logs.

    state = train(config, workdir)                        # resumes from workdir's latest checkpoint

Loading a finished workdir for sampling lives in ``dpmjax.workdir``.

Logs go to stdout and ``workdir/metrics.jsonl`` always, and to TensorBoard through clu's metric writers
when the ``tf`` extra is installed. A non-finite loss stops training with the step number; the last good
checkpoint stays on disk (orbax writes each checkpoint to a temporary directory and renames it).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dpmjax.nn import build_model, init_params
from dpmjax.schedules import schedule_from_config
from dpmjax.sharding import make_mesh, replicated
from dpmjax.train import checkpoint, optim
from dpmjax.train.state import TrainState, create_train_state
from dpmjax.train.step import make_train_step


def build_data(config, split: str = "train"):
    from dpmjax.data import get_dataset

    return get_dataset(config.data.name, split, **dict(config.data.get("kwargs", {})))


def _apply_fn(model, schedule):
    from dpmjax.nn import network_time

    conditional = getattr(model, "num_classes", None) is not None

    def apply(params, x_t, t, y, key):
        return model.apply(params, x_t, network_time(schedule, t), y=y if conditional else None, train=True,
                           rngs={"dropout": key})

    return apply


class _Writer:
    """stdout + JSONL always; TensorBoard through clu when TensorFlow/tensorboard import."""

    def __init__(self, workdir: str):
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from clu import metric_writers
            self.tb = metric_writers.create_default_writer(workdir, just_logging=False)
        except Exception:  # noqa: BLE001 - clu.metric_writers needs TensorFlow (the `tf` extra)
            self.tb = None

    def write(self, step: int, scalars: dict):
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.write_scalars(step, scalars)

    def close(self):
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def train(config, workdir: str, *, num_devices: int | None = None, quiet: bool = False,
          stop_after: int | None = None) -> TrainState:
    """Train ``config`` in ``workdir`` for ``config.train.num_steps`` steps (resuming if checkpoints exist).

    ``stop_after`` ends the run after that many steps of this call (tests use it to simulate an interruption).
    """
    from clu import metrics as clu_metrics

    from dpmjax.data import BatchIterator

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(num_devices)
    schedule = schedule_from_config(config.schedule)
    model = build_model(config.model)
    source = build_data(config)
    params = init_params(model, source.image_shape, config.seed)
    t = config.train
    tx = optim.make_optimizer(total_steps=t.num_steps, **dict(config.optim))
    state = jax.device_put(create_train_state(params, tx, config.seed), replicated(mesh))
    batches = BatchIterator(source, config.data.batch_size, seed=config.seed, mesh=mesh,
                            random_flip=config.data.get("random_flip", False))

    mngr = checkpoint.manager(workdir, t.keep_checkpoints)
    if mngr.latest_step() is not None:
        state, meta = checkpoint.restore(mngr, state)
        if meta.get("config_model") != json.loads(config.model.to_json()):
            raise checkpoint.CheckpointError(
                f"checkpoint in {mngr.directory} was trained with model config {meta.get('config_model')}, "
                f"not {config.model.to_dict()}: use another --workdir")
        batches.set_state(meta["data_state"])
    step_fn = make_train_step(_apply_fn(model, schedule), tx, schedule, mesh, target=t.target,
                              min_snr_gamma=t.min_snr_gamma if t.min_snr_gamma > 0 else None,
                              ema_decay=t.ema_decay)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))

    writer = _Writer(workdir)
    start = int(state.step)
    end = t.num_steps if stop_after is None else min(t.num_steps, start + stop_after)
    average = None
    tick = time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=t.num_steps, disable=quiet, desc="train", unit="step")

    def save(step):
        checkpoint.save(mngr, step, state, {"data_state": batches.get_state(),
                                            "config_model": json.loads(config.model.to_json())})

    try:
        for step in bar:
            state, metrics = step_fn(state, next(batches))
            update = clu_metrics.Average.from_model_output(metrics["loss"])
            average = update if average is None else average.merge(update)
            done = step + 1
            if done % t.log_every == 0 or done == end:
                with jax.numpy_dtype_promotion("standard"):  # clu divides a float total by an int count
                    loss = float(average.compute())
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} by step {done}; stopping. The last good checkpoint is step "
                        f"{mngr.latest_step()} in {mngr.directory}")
                elapsed = time.perf_counter() - tick
                rate = t.log_every * config.data.batch_size / max(elapsed, 1e-9)
                writer.write(done, {"loss": loss, "grad_norm": float(metrics["grad_norm"]), "images_per_s": rate})
                bar.set_postfix(loss=f"{loss:.4f}")
                average, tick = None, time.perf_counter()
            if done % t.checkpoint_every == 0 or done == end:
                save(done)
    finally:
        writer.close()
        mngr.wait_until_finished()
        mngr.close()  # stop orbax's background threads before the caller compiles anything else
    return state
