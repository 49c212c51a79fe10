"""Training: 1 vs 8 devices, bit-identical resume, the loss falls, configs build, and bad input."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.train import checkpoint
from dpmjax.nn import build_model, init_params
from dpmjax.schedules import schedule_from_config
from dpmjax.train.loop import train
from dpmjax.workdir import load_for_sampling


def tiny_config(**train_overrides):
    config = load_config(os.path.join(configs_dir(), "digits.py"))
    with config.unlocked():
        config.model.update(model_channels=8, channel_mult=(1,), num_res_blocks=1, mid_attention=False,
                            num_groups=4)
        config.data.batch_size = 16
        config.optim.update(learning_rate=1e-3, warmup_steps=0, decay="constant")
        config.train.update({"num_steps": 4, "log_every": 2, "checkpoint_every": 2, **train_overrides})
    return config


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def params_of(workdir):
    import orbax.checkpoint as ocp
    mngr = checkpoint.manager(workdir)
    try:
        return mngr.restore(mngr.latest_step(),
                            args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        mngr.close()


def test_one_and_eight_devices_give_the_same_loss(tmp_path):
    assert jax.device_count() == 8
    config = tiny_config(num_steps=2, log_every=1)
    train(config, str(tmp_path / "one"), num_devices=1, quiet=True)
    train(config, str(tmp_path / "eight"), num_devices=8, quiet=True)
    np.testing.assert_allclose(losses(tmp_path / "one"), losses(tmp_path / "eight"), rtol=1e-5, atol=1e-6)


def test_interrupted_run_resumes_bit_identically(tmp_path):
    config = tiny_config()
    train(config, str(tmp_path / "full"), quiet=True)
    train(config, str(tmp_path / "split"), quiet=True, stop_after=2)
    assert checkpoint.manager(str(tmp_path / "split")).latest_step() == 2
    train(config, str(tmp_path / "split"), quiet=True)  # resumes at step 2, data iterator included
    full, split = params_of(str(tmp_path / "full")), params_of(str(tmp_path / "split"))
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(split)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_tiny_run_lowers_the_loss_and_samples(tmp_path):
    config = tiny_config(num_steps=60, log_every=10, checkpoint_every=60)
    with config.unlocked():
        config.optim.learning_rate = 3e-3
    train(config, str(tmp_path), quiet=True)
    history = losses(tmp_path)
    assert history[-1] < 0.6 * history[0], history
    model_fn, schedule, loaded = load_for_sampling(str(tmp_path))
    import dpmjax
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    out = dpmjax.sample(model_fn, x, schedule=schedule, solver="dpmpp_2m", nfe=4)
    assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(configs_dir(), "*.py"))))
def test_every_config_builds(path):
    config = load_config(path)
    model = build_model(config.model)
    schedule_from_config(config.schedule)
    params = init_params(model, tuple(config.data.image_shape), config.seed)
    x = np.zeros((2,) + tuple(config.data.image_shape), np.float32)
    y = np.zeros((2,), np.int32) if config.model.get("num_classes") else None
    out = model.apply(params, x, np.zeros((2,), np.float32), y=y)
    assert out.shape == x.shape


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(num_steps=4)
    train(config, str(tmp_path), quiet=True, stop_after=2)
    import dpmjax.train.loop as loop
    real = loop.build_data

    def poisoned(config, split="train"):
        source = real(config, split)
        import dataclasses
        return dataclasses.replace(source, images=np.full_like(source.images, np.nan))

    monkeypatch.setattr(loop, "build_data", poisoned)
    with pytest.raises(FloatingPointError, match=r"by step 4.*last good checkpoint is step 2"):
        train(config, str(tmp_path), quiet=True)
    assert checkpoint.manager(str(tmp_path)).latest_step() == 2


def test_corrupt_checkpoint_is_named_not_silently_restarted(tmp_path):
    config = tiny_config(num_steps=2)
    train(config, str(tmp_path), quiet=True)
    for path in glob.glob(str(tmp_path / "checkpoints" / "2" / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(path) and not path.endswith(".json"):
            with open(path, "wb") as f:
                f.write(b"garbage")
    with config.unlocked():
        config.train.num_steps = 4
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints/2"):
        train(config, str(tmp_path), quiet=True)


def test_misspelled_config_key_names_the_nearest(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'train.num_steps'"):
        load_config(os.path.join(configs_dir(), "digits.py"), ["--config.train.num_step=3"])
    config = load_config(os.path.join(configs_dir(), "digits.py"), ["--config.train.num_steps=3"])
    assert config.train.num_steps == 3


def test_cifar10_config_runs_one_step_on_mock_data(tmp_path):
    """The GPU/TPU config builds and trains one step here, on TFDS mock data (no download)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    config = load_config(os.path.join(configs_dir(), "cifar10.py"),
                         ["--config.data.batch_size=8", "--config.train.num_steps=1", "--config.train.log_every=1",
                          "--config.train.checkpoint_every=1"])
    with tfds.testing.mock_data(num_examples=16):
        train(config, str(tmp_path), num_devices=1, quiet=True)
    assert np.isfinite(losses(tmp_path)[0])
