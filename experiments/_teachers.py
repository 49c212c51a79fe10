"""The teachers of the method experiments, trained once and reused (experiment helper, not a script).

    from _teachers import teacher_workdir, real_split
    workdir = teacher_workdir("digits")            # results/teachers/digits-<config hash>, trained if missing
    images, labels = real_split("digits", "test")  # held-out real images [N, H, W, C] in [-1, 1]

Every method experiment finetunes / distils the same teacher per dataset, so their tables compare methods,
not teachers. A teacher is trained by ``dpmjax.train.loop.train`` from ``configs/<dataset>.py`` (digits: the
quickstart model, a few minutes on 2 cores; fashion_mnist: ``configs/fashion_mnist.py`` with ``OVERRIDES``)
into ``results/teachers/<name>-<hash of the config>``; a
finished run is reused, and editing the config trains a new one.
"""
from __future__ import annotations

import fcntl
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHERS = os.path.join(ROOT, "results", "teachers")
DATASETS = ("digits", "fashion_mnist")
# The Fashion-MNIST teacher of the method experiments: configs/fashion_mnist.py made unconditional (DMD2, DPM-OT
# and the step-by-step student take unconditional teachers) and without attention, v-prediction like the digits
# teacher, 3000 steps at batch 64 (about 15-20 minutes on 2 idle cores).
OVERRIDES = {
    "digits": [],
    "fashion_mnist": ["--config.model.num_classes=None", "--config.model.label_dropout=0.0",
                      "--config.model.attention_resolutions=()", "--config.model.mid_attention=False",
                      "--config.train.target=v", "--config.train.num_steps=3000", "--config.optim.learning_rate=2e-3",
                      "--config.sample.guidance_scale=1.0", "--config.sample.spacing=karras"],
}


def teacher_workdir(dataset: str = "digits", *, variant: str = "", name: str | None = None, overrides=None,
                    quiet: bool = True) -> str:
    """The workdir of the ``dataset`` teacher (``configs/<dataset>.py[:variant]`` plus ``overrides``, default
    ``OVERRIDES[dataset]``), trained now if it has no final checkpoint."""
    from dpmjax.config import configs_dir, load_config
    from dpmjax.train.loop import train
    from dpmjax.workdir import checkpoint_steps

    import hashlib

    overrides = OVERRIDES.get(dataset, []) if overrides is None else overrides
    path = os.path.join(configs_dir(), f"{dataset}.py") + (f":{variant}" if variant else "")
    config = load_config(path, list(overrides))
    tag = hashlib.sha256(config.to_json().encode()).hexdigest()[:8]  # an edited config trains a new teacher
    workdir = os.path.join(TEACHERS, f"{name or dataset + (f'_{variant}' if variant else '')}-{tag}")
    os.makedirs(TEACHERS, exist_ok=True)
    with open(workdir + ".lock", "w") as lock:  # experiments started side by side train one teacher, once
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if checkpoint_steps(workdir)[-1] >= config.train.num_steps:
                return workdir
        except FileNotFoundError:
            pass
        print(f"training the {dataset} teacher in {workdir} ({config.train.num_steps} steps)", flush=True)
        train(config, workdir, quiet=quiet)
    return workdir


def real_split(dataset: str = "digits", split: str = "test"):
    """(images float32 [N, H, W, C] in [-1, 1], labels int32 [N]) of a split (digits: 'train' / 'test' as
    training and ``dpmjax quickstart`` use them)."""
    from dpmjax.data import get_dataset
    from dpmjax.metrics.domain import all_images

    return all_images(get_dataset(dataset, split))


def nearest_distances(samples, reference, chunk=8192, exclude_self=False):
    """L2 distance of each sample to its nearest reference image, float64 [N] (reference in chunks of ``chunk``);
    ``exclude_self``: ``reference`` is ``samples`` and an image is not its own neighbour."""
    import numpy as np

    a = np.asarray(samples, np.float64).reshape(len(samples), -1)
    b = np.asarray(reference, np.float64).reshape(len(reference), -1)
    best = np.full(len(a), np.inf)
    for i in range(0, len(b), chunk):
        part = b[i:i + chunk]
        squared = (a ** 2).sum(1)[:, None] + (part ** 2).sum(1)[None, :] - 2.0 * a @ part.T
        if exclude_self:
            rows = np.arange(i, min(i + len(part), len(a)))
            squared[rows, rows - i] = np.inf
        best = np.minimum(best, squared.min(axis=1))
    return np.sqrt(np.maximum(best, 0.0))
