"""The training loop: config -> model, data, sharded state and step, checkpoints, logs.

    state = train(config, workdir)                        # resumes from workdir's latest checkpoint

Loading a finished workdir for sampling lives in ``dpmjax.workdir``.

How it fits a pod (big_vision's ``train.py`` pattern):
  * everything is validated first (intervals, batch divisibility, the sharding rule and, for ``fsdp``, that
    every large parameter has a divisible axis): a ``ValueError`` naming the argument, before anything is
    restored or compiled;
  * the TrainState is built abstractly (``jax.eval_shape``), its shardings come from
    ``config.train.sharding`` (``"replicate"`` or ``"fsdp"``, see ``dpmjax.sharding``), and one jitted init
    with those ``out_shardings`` materialises it already sharded (or the checkpoint is restored straight into
    them);
  * the step computes its metrics on device (``StepMetrics``): the host fetches them only at log and
    checkpoint steps;
  * checkpoints are saved asynchronously on accelerators (``dpmjax.train.checkpoint``).

Nothing lost:
  * a non-finite loss, gradient norm or state is detected inside the step (a flag carried in the metrics) and
    checked at every log *and* checkpoint step: training stops with the step it happened at, nothing
    non-finite is saved, and the message names the last finite checkpoint;
  * SIGINT / SIGTERM save a checkpoint of the current (finite) state, then the run ends (KeyboardInterrupt,
    or exit status 128 + signal number for SIGTERM);
  * a resume prints "resuming from step N (checkpoint DIR)", drops ``metrics.jsonl`` rows logged after step N,
    and refuses a config that changes what the checkpoint means (``dpmjax.train.resume``).

Logs go to stdout and ``workdir/metrics.jsonl`` always, and to TensorBoard through clu's metric writers
when the ``tf`` extra is installed. In a multi-process run (``jax.distributed.initialize()`` first) every
process runs this same function; process 0 writes the logs and config files, and all write checkpoints
together (orbax).
"""
from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from dpmjax.nn import build_model, init_params
from dpmjax.schedules import schedule_from_config
from dpmjax.sharding import SHARDING_RULES, data_axis_size, make_mesh, sharding_rule
from dpmjax.train import autoencoder, checkpoint, losses, optim, resume
from dpmjax.train.state import TrainState, create_train_state
from dpmjax.train.step import make_train_step


def build_data(config, split: str = "train"):
    from dpmjax.data import get_dataset

    source = get_dataset(config.data.name, split, **dict(config.data.get("kwargs", {})))
    shots = config.data.get("shots")
    if shots is not None:  # few-shot adaptation: the first `shots` images (dpmjax.data.few_shot)
        from dpmjax.data.few_shot import take_shots
        source = take_shots(source, shots)
    if config.data.get("latent") is not None:  # latent diffusion: the images encoded by a trained VAE workdir
        from dpmjax.data.latents import latent_source
        source = latent_source(config, source, split)
    return source


def _apply_fn(model, schedule):
    from dpmjax.nn import network_time

    conditional = getattr(model, "num_classes", None) is not None

    def apply(params, x_t, t, y, key):
        return model.apply(params, x_t, network_time(schedule, t), y=y if conditional else None, train=True,
                           rngs={"dropout": key})

    return apply


class MetricsWriter:
    """stdout + JSONL always; TensorBoard through clu when TensorFlow/tensorboard import."""

    def __init__(self, workdir: str):
        self.jsonl = open(os.path.join(workdir, resume.METRICS_FILE), "a")
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


# ------------------------------------------------------------------------------------------------ validation

def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def validate_train_config(config, mesh, stop_after=None) -> str:
    """Check the training settings (ValueError naming the argument); returns the sharding rule.

    Runs before anything is restored or compiled: a bad interval used to surface only after minutes of
    compiling (``checkpoint_every=0`` raised ZeroDivisionError at the first step).
    """
    t = config.train
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive_int(f"config.train.{name}", t.get(name))
    batch = _positive_int("config.data.batch_size", config.data.get("batch_size"))
    if stop_after is not None:
        _positive_int("stop_after", stop_after)
    rule = t.get("sharding", "replicate")
    if rule not in SHARDING_RULES:
        raise ValueError(f"config.train.sharding must be one of {SHARDING_RULES}, got {rule!r}")
    if t.get("target") not in losses.TARGETS:
        raise ValueError(f"config.train.target must be one of {losses.TARGETS}, got {t.get('target')!r}")
    gamma = t.get("min_snr_gamma", 0.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
        raise ValueError(f"config.train.min_snr_gamma must be >= 0 (0 disables it), got {gamma!r}")
    decay = t.get("ema_decay")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"config.train.ema_decay must be in [0, 1], got {decay!r}")
    devices = data_axis_size(mesh)
    if batch % devices:
        raise ValueError(f"config.data.batch_size={batch} is not divisible by the {devices} devices of the mesh's "
                         "data axis (each device takes an equal share of the batch)")
    return rule


# ------------------------------------------------------------------------------------------------ signals

class _StopRequests:
    """SIGINT / SIGTERM set a flag (the loop saves, then stops); a second signal acts at once as before.

    Handlers are installed only from the main thread (Python allows no other). In a multi-process run the
    flag is agreed at log and checkpoint steps (one tiny all-gather there), so every process saves the same
    step together; a single process checks it after every step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous[signum])  # a second Ctrl-C interrupts at once (the save is atomic)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def requested(self, sync_point: bool) -> bool:
        if jax.process_count() == 1:
            return self.signum is not None
        if not sync_point:
            return False
        from jax.experimental import multihost_utils
        with jax.transfer_guard("allow"):  # an explicit, tiny exchange at a sync point
            flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        self.signum = int(np.max(flags)) or None
        return self.signum is not None

    def stop(self, step: int, where: str):
        message = f"stopped by {signal.Signals(self.signum).name} after step {step}; {where}"
        print(message, flush=True)
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt(message)
        raise SystemExit(128 + self.signum)


# ------------------------------------------------------------------------------------------------ compile cache

# Jitted init and step functions by everything they close over, so a second ``train`` call in one process
# (a resume, a notebook, the tests) reuses the compiled programs instead of compiling them again.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_MAX = 4


def _cached(key, build):
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    value = _COMPILED[key] = build()
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return value


# ------------------------------------------------------------------------------------------------ the loop

def train(config, workdir: str, *, num_devices: int | None = None, quiet: bool = False,
          stop_after: int | None = None) -> TrainState:
    """Train ``config`` in ``workdir`` for ``config.train.num_steps`` steps (resuming if checkpoints exist).

    Args:
      config: a training config (``configs/*.py``); ``config.train.get("sharding", "replicate")`` picks the
        sharding rule of params, EMA and optimizer state.
      workdir: checkpoints, ``config.json``, ``config_history.jsonl`` and ``metrics.jsonl`` go here (on a
        multi-host run: a path every host sees, on a shared filesystem; the JSON files are written with plain
        file I/O, so a ``gs://`` URL needs a gcsfuse mount).
      num_devices: use the first N devices (default all, every host's).
      quiet: no progress bar.
      stop_after: end after that many steps of this call (tests use it to simulate an interruption).
    Raises:
      ValueError: bad settings (before anything compiles); ``resume.ConfigMismatchError`` for a config that
      may not resume the workdir; ``checkpoint.CheckpointError`` for a corrupt or non-finite checkpoint;
      ``FloatingPointError`` when training diverges.
    """
    from dpmjax.data import BatchIterator

    mesh = make_mesh(num_devices)
    rule = validate_train_config(config, mesh, stop_after)
    objective = autoencoder.validate_autoencoder_config(config)  # "diffusion" or "vae" (dpmjax.train.autoencoder)
    if config.data.get("latent") is not None:  # the VAE's latent shape against the model's, before any work
        from dpmjax.data.latents import check_latent_config
        check_latent_config(config)
    t = config.train
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mngr = checkpoint.manager(workdir, t.keep_checkpoints)
    writer = None
    try:
        latest = mngr.latest_step()
        checkpoint_config = None
        if latest is not None and not os.path.exists(os.path.join(workdir, resume.CONFIG_FILE)):
            checkpoint_config = checkpoint.restore_meta(workdir, latest)[1].get("config")
        previous = resume.check_resume_config(workdir, config, has_checkpoint=latest is not None,
                                              checkpoint_config=checkpoint_config)

        schedule = schedule_from_config(config.schedule)
        model = build_model(config.model)
        source = build_data(config)
        image_shape = tuple(source.image_shape)
        tx = optim.make_optimizer(total_steps=t.num_steps, **dict(config.optim))

        def init_state():
            return create_train_state(init_params(model, image_shape, config.seed), tx, config.seed)

        abstract = jax.eval_shape(init_state)
        shardings = sharding_rule(rule, mesh, abstract)  # fsdp: a clear error naming the parameter, pre-compile
        batches = BatchIterator(source, config.data.batch_size, seed=config.seed, mesh=mesh,
                                random_flip=config.data.get("random_flip", False))
        # What the jitted init and step close over (the optimizer sees num_steps only through a cosine decay).
        key = (config.model.to_json(), config.schedule.to_json(), config.optim.to_json(),
               int(t.num_steps) if config.optim.get("decay") == "cosine" else None, image_shape, int(config.seed),
               str(t.target), float(t.get("min_snr_gamma", 0.0)), float(t.ema_decay), rule, mesh, objective,
               float(t.get("vae_beta", 1e-3)), str(t.get("vae_reconstruction", "l1")))

        state, start, writer = resume_or_init(
            workdir, config, previous, mngr, latest, abstract, shardings, batches,
            lambda: _cached(("init",) + key, lambda: jax.jit(init_state, out_shardings=shardings))())
        gamma = float(t.get("min_snr_gamma", 0.0))
        if objective == "vae":
            step_fn = _cached(("step",) + key, lambda: autoencoder.make_autoencoder_step(
                model, tx, mesh, beta=float(t.get("vae_beta", 1e-3)),
                reconstruction=str(t.get("vae_reconstruction", "l1")), ema_decay=t.ema_decay, state_sharding=shardings))
        else:
            step_fn = _cached(("step",) + key, lambda: make_train_step(
                _apply_fn(model, schedule), tx, schedule, mesh, target=t.target,
                min_snr_gamma=gamma if gamma > 0 else None, ema_decay=t.ema_decay, state_sharding=shardings))
        return run_steps(config, state, step_fn, batches, mngr, writer, start, stop_after, quiet)
    finally:
        if writer is not None:
            writer.close()
        mngr.wait_until_finished()
        mngr.close()  # stop orbax's background threads before the caller compiles anything else


def resume_or_init(workdir, config, previous, mngr, latest, abstract, shardings, batches, init):
    """(state, start step, writer or None): the checkpoint ``latest`` restored into ``shardings`` (and the data
    position into ``batches``), or ``init()``; then the config history and metrics.jsonl brought to the start
    step and, on process 0, the metrics writer. Shared by ``train`` and ``dpmjax.methods.loop.finetune``."""
    primary = jax.process_index() == 0
    if latest is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state, meta = checkpoint.restore(mngr, target, latest)
        batches.set_state(meta["data_state"])
        if primary:
            print(f"resuming from step {latest} (checkpoint {os.path.join(str(mngr.directory), str(latest))})",
                  flush=True)
    else:
        state = init()
    start = int(latest or 0)
    writer = None
    if primary:
        resume.record_config(workdir, config, previous, start)
        resume.truncate_metrics(workdir, start)
        writer = MetricsWriter(workdir)
    return state, start, writer


class StepFailedError(RuntimeError):
    """A step raised at run time (e.g. a black-box reward's host code inside it); the checkpoints stay."""


def _failed_at_run_time(err) -> bool:
    """Whether ``err`` came from executing a compiled step (XLA's status, e.g. a host callback that raised:
    a JaxRuntimeError, or a ValueError with XLA's "INTERNAL:" status when jit re-raises it) rather than from
    tracing it (a ValueError of user code, which propagates unchanged)."""
    return isinstance(err, jax.errors.JaxRuntimeError) or str(err).startswith("INTERNAL:")


def run_steps(config, state, step_fn, batches, mngr, writer, start, stop_after, quiet, init_metrics=None):
    """The step loop of ``train`` and of ``dpmjax.methods.loop.finetune``: steps, logs, the non-finite stop,
    checkpoints and signal saves.

    ``step_fn(state, batch, metrics) -> (state, metrics)`` with ``metrics`` a ``StepMetrics``; ``init_metrics()``
    (default ``step_fn.init_metrics``) a fresh one; ``batches`` an iterator with ``get_state()``;
    ``config.train`` holds the intervals, ``config.data.batch_size`` the images per step. Returns the state.
    """
    init_metrics = init_metrics or step_fn.init_metrics
    t = config.train
    end = t.num_steps if stop_after is None else min(t.num_steps, start + stop_after)
    config_json = json.loads(config.to_json())
    last_saved = start if start > 0 else None  # restored checkpoints were verified finite
    metrics = init_metrics()
    logged_at, tick = start, time.perf_counter()
    bar = tqdm(range(start, end), initial=start, total=t.num_steps, disable=quiet or writer is None, desc="train",
               unit="step")

    def last_finite():
        return (f"the last finite checkpoint is step {last_saved} in {mngr.directory}" if last_saved is not None
                else f"no checkpoint was saved in {mngr.directory}")

    with _StopRequests() as stop_requests:
        for step in bar:
            done = step + 1
            log_now = done % t.log_every == 0 or done == end
            save_now = done % t.checkpoint_every == 0 or done == end
            try:  # host code inside the step (a black-box reward's callback) fails at the next sync
                state, metrics = step_fn(state, next(batches), metrics)
                stopping = stop_requests.requested(sync_point=log_now or save_now)
                if not (log_now or save_now or stopping):
                    continue
                host = jax.device_get(metrics)  # the only host sync: a few scalars, at log / checkpoint steps
            except (jax.errors.JaxRuntimeError, ValueError) as err:
                if not _failed_at_run_time(err):
                    raise
                reason = str(err).strip().splitlines()[-1]  # the exception's own line, not XLA's traceback
                raise StepFailedError(f"the step failed between step {logged_at + 1} and step {done}: {reason}; "
                                      f"{last_finite()}") from err
            if not bool(host.finite):
                raise FloatingPointError(
                    f"training diverged: the loss, gradient norm or state became NaN or inf at step "
                    f"{int(host.first_nonfinite)} (checked at step {done}); nothing non-finite was saved; "
                    f"{last_finite()}")
            if log_now and writer is not None:
                elapsed = time.perf_counter() - tick
                rate = (done - logged_at) * config.data.batch_size / max(elapsed, 1e-9)
                scalars = host.means()
                writer.write(done, {**scalars, "images_per_s": rate})
                bar.set_postfix({name: f"{value:.4g}" for name, value in list(scalars.items())[:3]})
            if log_now:
                metrics, logged_at, tick = init_metrics(), done, time.perf_counter()
            if (save_now or stopping) and done != last_saved:
                checkpoint.save(mngr, done, state, {"data_state": batches.get_state(), "config": config_json})
                last_saved = done
            if stopping:
                mngr.wait_until_finished()
                stop_requests.stop(done, f"saved checkpoint {os.path.join(str(mngr.directory), str(done))}")
    return state
