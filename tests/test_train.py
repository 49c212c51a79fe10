"""Training: 1 vs 8 devices, bit-identical resume (after stop, SIGINT / SIGTERM, or a crash between a log and a
checkpoint), the NaN guard under hard setups, config changes on resume, losses against a hand computation,
configs build, and bad input named before compiling."""
import glob
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.nn import build_model, init_params
from dpmjax.schedules import betas_for_name, schedule_from_config
from dpmjax.train import checkpoint, losses
from dpmjax.train.loop import train
from dpmjax.train.resume import ConfigMismatchError
from dpmjax.workdir import load_for_sampling

from tiny_configs import tiny_unet_config  # noqa: E402  (tests/tiny_configs.py)


tiny_config = tiny_unet_config


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses_of(workdir):
    return [row["loss"] for row in rows(workdir)]


def steps_on_disk(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                  if os.path.basename(p).isdigit())


def params_of(workdir, step=None):
    """The verified state of a checkpoint (restore raises if it is corrupt or non-finite)."""
    config = tiny_config()
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    from dpmjax.train import optim
    from dpmjax.train.state import create_train_state
    model = build_model(saved["model"])
    tx = optim.make_optimizer(total_steps=saved["train"]["num_steps"], **saved["optim"])
    abstract = jax.eval_shape(lambda: create_train_state(init_params(model, (8, 8, 1), config.seed), tx, 0))
    mngr = checkpoint.manager(workdir)
    try:
        return checkpoint.restore(mngr, abstract, step)[0]
    finally:
        mngr.close()


class HookedSource:
    """A data source that calls ``hook(call_number, batch)`` on each batch read (1-based): the loop reads one
    batch per step, so call n is the batch of step n of a run that starts at 0."""

    def __init__(self, source, hook):
        self.source, self.hook, self.calls = source, hook, 0
        self.image_shape, self.num_classes = source.image_shape, source.num_classes

    def __len__(self):
        return len(self.source)

    def get_batch(self, indices):
        self.calls += 1
        return self.hook(self.calls, self.source.get_batch(indices))


def hook_data(monkeypatch, hook):
    import dpmjax.train.loop as loop
    real = loop.build_data
    monkeypatch.setattr(loop, "build_data", lambda config, split="train": HookedSource(real(config, split), hook))


# ------------------------------------------------------------------------------------------------ devices, resume

def test_one_and_eight_devices_give_the_same_loss(tmp_path):
    assert jax.device_count() == 8
    config = tiny_config(num_steps=2, log_every=1)
    train(config, str(tmp_path / "one"), num_devices=1, quiet=True)
    train(config, str(tmp_path / "eight"), num_devices=8, quiet=True)
    np.testing.assert_allclose(losses_of(tmp_path / "one"), losses_of(tmp_path / "eight"), rtol=1e-5, atol=1e-6)


def test_interrupted_run_resumes_bit_identically(tmp_path, capsys):
    config = tiny_config()
    train(config, str(tmp_path / "full"), quiet=True)
    train(config, str(tmp_path / "split"), quiet=True, stop_after=2)
    assert steps_on_disk(tmp_path / "split") == [2]
    capsys.readouterr()
    with jax.transfer_guard_device_to_host("disallow"):  # as the CLI runs it: host reads only explicit ones
        train(config, str(tmp_path / "split"), quiet=True)  # resumes at step 2, data iterator included
    assert f"resuming from step 2 (checkpoint {tmp_path / 'split' / 'checkpoints' / '2'})" in capsys.readouterr().out
    full, split = params_of(str(tmp_path / "full")), params_of(str(tmp_path / "split"))
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(split)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert losses_of(tmp_path / "split") == losses_of(tmp_path / "full")


def test_rows_logged_after_the_restored_checkpoint_are_not_duplicated(tmp_path):
    """A run killed after logging steps 3-4 but before saving step 4 resumes from 2: rows 3-4 are logged again
    and must replace the old ones (same values: the resume is bit-identical), not be appended twice."""
    config = tiny_config(log_every=1)
    workdir = str(tmp_path / "run")
    train(config, workdir, quiet=True)
    before = rows(workdir)
    assert [r["step"] for r in before] == [1, 2, 3, 4] and steps_on_disk(workdir) == [2, 4]
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # the kill came before checkpoint 4 was written
    train(config, workdir, quiet=True)
    after = rows(workdir)
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert [r["loss"] for r in after] == [r["loss"] for r in before]


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_signal_saves_the_current_step_then_the_resume_loses_nothing(tmp_path, monkeypatch, capsys, signum,
                                                                      raised):
    config = tiny_config()  # checkpoints at 2 and 4 only
    train(config, str(tmp_path / "full"), quiet=True)

    def send_signal(call, batch):
        if call == 3:  # while step 3 reads its batch (as if Ctrl-C came during step 3)
            os.kill(os.getpid(), signum)
        return batch

    hook_data(monkeypatch, send_signal)
    workdir = str(tmp_path / "run")
    handler = signal.getsignal(signum)
    with pytest.raises(raised) as info:
        train(config, workdir, quiet=True)
    if raised is SystemExit:
        assert info.value.code == 128 + signum
    assert signal.getsignal(signum) is handler  # the caller's handler is back
    assert steps_on_disk(workdir) == [2, 3]  # step 3 saved on the signal
    assert f"stopped by {signal.Signals(signum).name} after step 3" in capsys.readouterr().out
    monkeypatch.undo()
    train(config, workdir, quiet=True)
    assert "resuming from step 3" in capsys.readouterr().out
    for a, b in zip(jax.tree.leaves(params_of(str(tmp_path / "full"))), jax.tree.leaves(params_of(workdir))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in rows(workdir)] == [2, 4]


def test_a_tiny_run_lowers_the_loss_and_samples(tmp_path):
    config = tiny_config(num_steps=60, log_every=10, checkpoint_every=60)
    with config.unlocked():
        config.optim.learning_rate = 3e-3
    train(config, str(tmp_path), quiet=True)
    history = losses_of(tmp_path)
    assert history[-1] < 0.6 * history[0], history
    model_fn, schedule, loaded = load_for_sampling(str(tmp_path))
    import dpmjax
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    out = dpmjax.sample(model_fn, x, schedule=schedule, solver="dpmpp_2m", nfe=4)
    assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))


# ------------------------------------------------------------------------------------------------ NaN guard

def test_nan_at_a_checkpoint_step_between_log_steps_is_never_saved(tmp_path, monkeypatch):
    """log every 5, checkpoint every 2, keep 2: a NaN batch at step 6 (a checkpoint step, not a log step). The
    guard used to look only at log steps: it saved NaN states at 6 and 8, rotated the finite 2 and 4 out, and
    named the NaN step 8 as "the last good checkpoint"."""
    config = tiny_config(num_steps=10, log_every=5, checkpoint_every=2, keep_checkpoints=2)

    def nan_at_step_6(call, batch):
        if call == 6:
            batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
        return batch

    hook_data(monkeypatch, nan_at_step_6)
    workdir = str(tmp_path)
    with pytest.raises(FloatingPointError, match=r"NaN or inf at step 6 \(checked at step 6\).*"
                                                 r"last finite checkpoint is step 4 in"):
        train(config, workdir, quiet=True)
    assert steps_on_disk(workdir) == [2, 4]  # nothing saved at 6, nothing rotated out
    for step in (2, 4):
        params_of(workdir, step)  # verified finite
    assert [r["step"] for r in rows(workdir)] == [5]
    monkeypatch.undo()  # the bad batch is gone: training resumes from the last finite checkpoint
    train(config, workdir, quiet=True)
    # keep-N: saves at 6, 8, 10 leave exactly the 2 newest; row 5 was dropped on resume and logged again
    assert steps_on_disk(workdir) == [8, 10] and [r["step"] for r in rows(workdir)] == [5, 10]


def huge_lr_v_config(**train_overrides):
    """lr = 1e38, target v with Min-SNR-5: shared by the next test and the loss-wiring test (one compile)."""
    config = tiny_config(target="v", min_snr_gamma=5.0, **train_overrides)
    with config.unlocked():
        config.optim.learning_rate = 1e38
    return config


def test_a_huge_learning_rate_stops_before_saving_a_non_finite_state(tmp_path):
    """lr = 1e38: step 1 is finite (parameters ~1e38), step 2 overflows. With checkpoints every step and logs
    every 5, the old guard saved the NaN states 2-4 (keep 3 deleting the finite one) and blamed step 4."""
    config = huge_lr_v_config(num_steps=6, log_every=5, checkpoint_every=1, keep_checkpoints=3)
    with pytest.raises(FloatingPointError, match=r"NaN or inf at step 2 .*last finite checkpoint is step 1 in"):
        train(config, str(tmp_path), quiet=True)
    assert steps_on_disk(str(tmp_path)) == [1]
    assert np.isfinite(np.asarray(jax.tree.leaves(params_of(str(tmp_path), 1).params)[0])).all()


# ------------------------------------------------------------------------------------------------ config on resume

def test_a_resume_with_another_meaning_is_refused_and_harmless_changes_are_recorded(tmp_path):
    workdir = str(tmp_path)
    train(tiny_config(), workdir, quiet=True, stop_after=2)
    refused = tiny_config()
    trained_target = refused.train.target
    with refused.unlocked():
        refused.train.target = "x0"
    with pytest.raises(ConfigMismatchError,
                       match=rf"refusing to resume .*\n  train.target: '{trained_target}' -> 'x0'\n"):
        train(refused, workdir, quiet=True)
    with refused.unlocked():
        refused.model.model_channels = 8
    with pytest.raises(ValueError, match=rf"model.model_channels: 16 -> 8\n  train.target: '{trained_target}' -> 'x0'"):
        train(refused, workdir, quiet=True)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["target"] == trained_target  # the refused runs overwrote nothing
    longer = tiny_config(num_steps=6, log_every=1, keep_checkpoints=5)
    train(longer, workdir, quiet=True)
    assert steps_on_disk(workdir) == [2, 4, 6]
    with open(os.path.join(workdir, "config_history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    assert [h["step"] for h in history] == [0, 2]
    assert history[0]["config"]["train"]["num_steps"] == 4
    assert history[1]["changes"] == {"train.num_steps": [4, 6], "train.log_every": [2, 1],
                                     "train.keep_checkpoints": [3, 5]}
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 6


# ------------------------------------------------------------------------------------------------ losses

def hand_loss(x0, noise, n, out, target, gamma):
    """Mean over the batch of w(t) * mean((out - target)^2), in float64 from DDPM's linear betas: alpha_t^2 =
    prod_{i <= n} (1 - beta_i) at t = (n + 1) / N; SNR = alpha^2 / sigma^2; Min-SNR-gamma (Hang et al. 2023,
    eq. 7) weights min(SNR, gamma) / SNR (eps), min(SNR, gamma) (x0), min(SNR, gamma) / (SNR + 1) (v)."""
    alphas_cumprod = np.cumprod(1.0 - betas_for_name("linear", 1000, 1e-4, 0.02))
    a2 = alphas_cumprod[np.asarray(n)]
    alpha, sigma, snr = np.sqrt(a2), np.sqrt(1.0 - a2), a2 / (1.0 - a2)
    x0, noise, out = (np.asarray(v, np.float64) for v in (x0, noise, out))
    expand = lambda v: v[:, None, None, None]  # noqa: E731
    wanted = {"eps": noise, "x0": x0, "v": expand(alpha) * noise - expand(sigma) * x0}[target]
    weight = {"eps": np.minimum(snr, gamma) / snr, "x0": np.minimum(snr, gamma),
              "v": np.minimum(snr, gamma) / (snr + 1.0)}[target] if gamma else np.ones_like(snr)
    return float(np.mean(weight * np.mean((out - wanted) ** 2, axis=(1, 2, 3))))


def draws(key, batch, shape):
    """The (timestep index n, noise) ``denoising_loss`` draws from ``key`` (its documented recipe)."""
    k_t, k_noise, _ = jax.random.split(key, 3)
    return jax.random.randint(k_t, (batch,), 0, 1000), jax.random.normal(k_noise, (batch,) + shape, jnp.float32)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_denoising_loss_matches_a_hand_computation(target, gamma, rng):
    schedule = schedule_from_config({"name": "linear", "num_train_timesteps": 1000})
    x0 = rng.uniform(-1, 1, (6, 4, 4, 1)).astype(np.float32)
    key = jax.random.key(3)
    n, noise = draws(key, 6, (4, 4, 1))
    alpha2 = np.cumprod(1.0 - betas_for_name("linear", 1000, 1e-4, 0.02))[np.asarray(n)][:, None, None, None]
    x_t = np.sqrt(alpha2) * x0 + np.sqrt(1.0 - alpha2) * np.asarray(noise, np.float64)

    def apply_fn(params, x, t, y, key):
        return params["scale"] * x  # a prediction that is neither target

    loss, _ = losses.denoising_loss(apply_fn, {"scale": jnp.float32(0.3)}, {"image": jnp.asarray(x0)}, key, schedule,
                                    target=target, min_snr_gamma=gamma)
    expected = hand_loss(x0, noise, n, 0.3 * x_t, target, gamma)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)  # float32 loss vs float64 hand computation
    for other in {"eps", "x0", "v"} - {target}:  # would fail if `target` were trained as another target
        assert abs(hand_loss(x0, noise, n, 0.3 * x_t, other, gamma) - expected) > 1e-2 * expected


def test_the_loop_trains_the_configured_target_and_weighting(tmp_path):
    """config.train.target = "v" with min_snr_gamma = 5 reaches the step: a fresh UNet outputs 0 (zero-init
    conv_out), so the first logged loss is the hand-computed weighted mean of v^2 on the first batch (the loss
    of step 1 is computed before any update: the learning rate does not matter)."""
    from dpmjax.data import BatchIterator, get_dataset
    config = huge_lr_v_config(num_steps=1, log_every=1, checkpoint_every=1)
    train(config, str(tmp_path), quiet=True)
    x0 = next(BatchIterator(get_dataset("digits", "train"), 16, seed=config.seed))["image"]
    n, noise = draws(jax.random.fold_in(jax.random.key(config.seed), 0), 16, (8, 8, 1))
    expected = {target: hand_loss(x0, noise, n, np.zeros_like(x0), target, 5.0) for target in ("eps", "x0", "v")}
    logged = losses_of(tmp_path)[0]
    np.testing.assert_allclose(logged, expected["v"], rtol=1e-4)
    assert min(abs(logged - expected["eps"]), abs(logged - expected["x0"])) > 1e-2 * logged


# ------------------------------------------------------------------------------------------------ configs, bad input

# the denoisers' configs; the autoencoder (kind "vae") and the deblurring UNet (kind "deblur_unet", which also
# reads the blurry image) take other inputs and are built by tests/test_vae.py and tests/test_deblur.py
OTHER_KINDS = ("vae", "deblur_unet")


def _denoiser_configs():
    return [path for path in sorted(glob.glob(os.path.join(configs_dir(), "*.py")))
            if load_config(path).model.get("kind") not in OTHER_KINDS]


@pytest.mark.parametrize("path", _denoiser_configs())
def test_every_config_builds(path):
    config = load_config(path)
    model = build_model(config.model)
    schedule_from_config(config.schedule)
    params = init_params(model, tuple(config.data.image_shape), config.seed)
    x = np.zeros((2,) + tuple(config.data.image_shape), np.float32)
    y = np.zeros((2,), np.int32) if config.model.get("num_classes") else None
    out = model.apply(params, x, np.zeros((2,), np.float32), y=y)
    assert out.shape == x.shape


@pytest.mark.parametrize("override, message", [
    ({"checkpoint_every": 0}, "config.train.checkpoint_every must be an integer >= 1, got 0"),
    ({"log_every": 0}, "config.train.log_every must be an integer >= 1, got 0"),
    ({"log_every": 2.5}, "config.train.log_every must be an integer >= 1, got 2.5"),  # e.g. a config file's 2.5
    ({"keep_checkpoints": 0}, "config.train.keep_checkpoints must be an integer >= 1, got 0"),
    ({"num_steps": -3}, "config.train.num_steps must be an integer >= 1"),
    ({"target": "score"}, "config.train.target must be one of"),
    ({"min_snr_gamma": -1.0}, "config.train.min_snr_gamma must be >= 0"),
    ({"ema_decay": 1.5}, r"config.train.ema_decay must be in \[0, 1\]"),
    ({"sharding": "zero3"}, "config.train.sharding must be one of"),
    ({"batch_size": 12}, "config.data.batch_size=12 is not divisible by the 8 devices"),
    ({"stop_after": 0}, "stop_after must be an integer >= 1"),
])
def test_bad_settings_are_named_before_anything_compiles(tmp_path, monkeypatch, override, message):
    import dpmjax.train.loop as loop

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(loop, "_cached", no_compile)
    config = tiny_config()
    kwargs = {}
    with config.unlocked():
        for key, value in override.items():
            if key == "batch_size":
                config.data.batch_size = value
            elif key == "stop_after":
                kwargs["stop_after"] = value
            elif isinstance(value, float) and isinstance(config.train[key], int):  # ConfigDict refuses the cast
                config.train = {**config.train.to_dict(), key: value}
            else:
                config.train[key] = value
    with pytest.raises(ValueError, match=message):
        train(config, str(tmp_path), quiet=True, **kwargs)
    assert not os.path.exists(tmp_path / "checkpoints")


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
    assert np.isfinite(losses_of(tmp_path)[0])


def test_a_run_compiles_its_step_once(tmp_path):
    """Fresh metric accumulators (after every log step here) are placed like the step's own output: a numpy
    accumulator was an uncommitted argument, and the second call compiled the whole step again."""
    from dpmjax.train import loop

    train(tiny_unet_config(num_steps=3, log_every=1, checkpoint_every=3), str(tmp_path), quiet=True)
    step = next(value for key, value in reversed(loop._COMPILED.items()) if key[0] == "step")  # noqa: SLF001
    assert step.jitted._cache_size() == 1  # noqa: SLF001


def test_optimizer_step_is_adamw_with_clipping_and_warmup_under_strict_promotion():
    """``optim.optimizer_step`` (every update of training and of the methods) against AdamW written out: the
    clipped gradient, bias-corrected moments, the warmup learning rate and decoupled weight decay, two steps."""
    from dpmjax.train import optim

    lr, warmup, wd, clip, b1, b2, eps = 0.1, 4, 0.01, 1.0, 0.9, 0.999, 1e-8
    tx = optim.make_optimizer(learning_rate=lr, warmup_steps=warmup, total_steps=10, decay="constant",
                              weight_decay=wd, b1=b1, b2=b2, grad_clip=clip)
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = [{"w": jnp.array([3.0, 4.0, 0.0])}, {"w": jnp.array([0.1, -0.2, 0.3])}]
    state = tx.init(params)
    p, m, v = np.array([1.0, -2.0, 0.5]), np.zeros(3), np.zeros(3)
    for count, g in enumerate(grads):
        params, state = optim.optimizer_step(tx, g, state, params)  # strict promotion is on in these tests
        g = np.asarray(g["w"], np.float64)
        g = g * min(1.0, clip / np.linalg.norm(g))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** (count + 1)), v / (1 - b2 ** (count + 1))
        rate = lr * count / warmup  # optax's linear warmup: the step count before this update
        p = p - rate * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
        np.testing.assert_allclose(np.asarray(params["w"]), p, rtol=1e-5, atol=1e-7)
