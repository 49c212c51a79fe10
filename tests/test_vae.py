"""KL autoencoder (dpmjax/nn/vae.py), its training objective (dpmjax/train/autoencoder.py) and latent diffusion
through it (dpmjax/data/latents.py, `dpmjax sample` on a latent workdir): the KL against Monte Carlo, shapes of odd
sizes, training lowers the loss, the latent scale gives unit variance, decoding at sample time, and the refusals."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.nn import build_model, init_params
from dpmjax.nn.vae import VAE, kl_to_standard_normal, latent_shape, reconstruction_error


def _vae_config(steps=24):
    config = load_config(os.path.join(configs_dir(), "vae_fashion_mnist.py") + ":digits,runlocal")
    with config.unlocked():
        config.optim.update(learning_rate=3e-3, warmup_steps=0, decay="constant")
        config.train.update(num_steps=steps, log_every=4, checkpoint_every=steps)
    return config


def _latent_config(vae_workdir, **data):
    config = load_config(os.path.join(configs_dir(), "latent_fashion_mnist.py") + f":digits,runlocal,vae={vae_workdir}")
    with config.unlocked():
        config.train.update(num_steps=4, log_every=2, checkpoint_every=4)
        config.data.update(data)
    return config


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory):
    from dpmjax.train.loop import train

    workdir = str(tmp_path_factory.mktemp("vae"))
    train(_vae_config(), workdir, quiet=True)
    return workdir


def test_kl_matches_a_monte_carlo_estimate():
    """KL(N(m, s^2) || N(0, 1)) in closed form == E_q[log q(z) - log p(z)] by 200k samples (std error ~0.3%)."""
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, 3)).astype(np.float32)
    logvar = rng.normal(scale=0.5, size=(2, 3)).astype(np.float32)
    z = mean + np.exp(0.5 * logvar) * rng.normal(size=(200_000, 2, 3))
    log_q = -0.5 * ((z - mean) ** 2 / np.exp(logvar) + logvar + np.log(2 * np.pi))
    log_p = -0.5 * (z ** 2 + np.log(2 * np.pi))
    monte_carlo = np.mean(np.sum(log_q - log_p, axis=2), axis=0)
    closed = np.asarray(kl_to_standard_normal(jnp.asarray(mean), jnp.asarray(logvar)))
    np.testing.assert_allclose(closed, monte_carlo, rtol=0.02)
    np.testing.assert_allclose(kl_to_standard_normal(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1))), [0.0])


def test_reconstruction_error_kinds_and_refusal():
    x, x_hat = jnp.zeros((2, 2, 2, 1)), jnp.full((2, 2, 2, 1), -0.5)
    np.testing.assert_allclose(reconstruction_error(x, x_hat, "l1"), [2.0, 2.0])
    np.testing.assert_allclose(reconstruction_error(x, x_hat, "mse"), [1.0, 1.0])
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        reconstruction_error(x, x_hat, "lpips")


@pytest.mark.parametrize("image_shape, channels, expected", [((28, 28, 1), (8, 8, 8), (7, 7, 3)),
                                                            ((8, 8, 1), (8, 8), (4, 4, 3)),
                                                            ((7, 9, 2), (8, 8), (4, 5, 3))])
def test_shapes_round_trip_including_odd_sizes(image_shape, channels, expected):
    """Latents of ceil(H / f) x ceil(W / f), and the decoder gives back exactly H x W (28 -> 14 -> 7 -> 28)."""
    model = VAE(channels=channels, latent_channels=3, image_shape=image_shape, num_groups=4)
    assert latent_shape(model) == expected
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, *image_shape)))[0])
    assert out[0].shape == (2, *image_shape) and out[1].shape == (2, *expected)


def test_train_true_reparameterises_and_train_false_uses_the_mean():
    model = build_model(_vae_config().model)
    variables = init_params(model, (8, 8, 1), 0)
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)
    recon_eval, mean, _ = jax.jit(model.apply)(variables, x)  # jitted: eager flax dispatches op by op
    decoded = jax.jit(lambda v, z: model.apply(v, z, method=VAE.decode))(variables, mean)
    np.testing.assert_allclose(recon_eval, decoded, atol=1e-6)
    sampled = jax.jit(lambda v, key: model.apply(v, x, train=True, rngs={"latent": key})[0])
    recon_a, recon_b = sampled(variables, jax.random.key(2)), sampled(variables, jax.random.key(3))
    assert float(jnp.max(jnp.abs(recon_a - recon_b))) > 0


def test_training_lowers_the_reconstruction_error(vae_workdir):
    rows = [json.loads(line) for line in open(os.path.join(vae_workdir, "metrics.jsonl"))]
    assert {"loss", "recon_mse", "kl", "grad_norm"} <= set(rows[0])
    assert rows[-1]["recon_mse"] < 0.8 * rows[0]["recon_mse"], rows


def test_objective_must_match_the_model_kind(tmp_path):
    from dpmjax.train.loop import train

    config = _vae_config()
    with config.unlocked():
        config.train.objective = "diffusion"
    with pytest.raises(ValueError, match="config.train.objective='vae'"):
        train(config, str(tmp_path / "a"), quiet=True)
    with config.unlocked():
        config.train.objective = "autoencoder"
    with pytest.raises(ValueError, match="config.train.objective must be one of"):
        train(config, str(tmp_path / "b"), quiet=True)


def test_latent_shape_mismatch_is_refused_before_any_work(vae_workdir, tmp_path):
    """A latent model of another shape than the VAE's latents: ValueError naming the option; nothing encoded."""
    from dpmjax.train.loop import train

    config = _latent_config(vae_workdir, image_shape=(4, 4, 4))
    with pytest.raises(ValueError, match=r"config.data.latent.vae_workdir=.*\(4, 4, 2\).*image_shape"):
        train(config, str(tmp_path / "ldm"), quiet=True)
    assert not os.path.exists(os.path.join(vae_workdir, "latents"))
    assert not os.path.exists(os.path.join(tmp_path, "ldm", "checkpoints"))
    with pytest.raises(ValueError, match="config.data.latent.scale_factor"):
        train(_latent_config(vae_workdir, latent=dict(vae_workdir=vae_workdir, scale_factor=-1.0)),
              str(tmp_path / "ldm2"), quiet=True)


def test_latent_source_has_unit_variance_and_latent_workdir_samples_decode(vae_workdir, tmp_path):
    """s = 1 / std gives latents of std 1 (the training split); `dpmjax sample` on the latent workdir writes
    decoded 8x8x1 images (not 4x4x2 latents) and a PNG grid."""
    from dpmjax.data.latents import latent_scale, latent_source
    from dpmjax.main import main
    from dpmjax.train.loop import train

    config = _latent_config(vae_workdir)
    source = latent_source(config)
    assert source.image_shape == (4, 4, 2)
    np.testing.assert_allclose(np.std(source.images.astype(np.float64)), 1.0, rtol=1e-4)
    assert latent_scale(config) > 0
    workdir = str(tmp_path / "ldm")
    train(config, workdir, quiet=True)
    out = str(tmp_path / "samples.npz")
    assert main(["sample", "--workdir", workdir, "--num", "8", "--out", out]) == 0
    images = np.load(out)["images"]
    assert images.shape == (8, 8, 8, 1) and np.isfinite(images).all()
    assert os.path.isfile(str(tmp_path / "samples.png"))


def test_sampling_or_serving_a_vae_workdir_is_refused_in_one_line(vae_workdir, capsys):
    """A VAE is not a denoiser: `dpmjax sample` / `eval` / `serve` on its workdir say so before loading anything."""
    from dpmjax.main import main

    for command in (["sample", "--workdir", vae_workdir, "--num", "4"], ["eval", "--workdir", vae_workdir],
                    ["serve", "--workdir", vae_workdir, "--port", "0"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds a VAE (config.model.kind='vae')" in err[0], err
