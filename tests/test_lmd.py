"""LMD (dpmjax/methods/lmd.py): the four mask-ratio schedules against the paper's formulas, fixed-shape masking,
the masked encoder against the literal MAE encoder, the loss on masked patches only, DDIM replacement inpainting
against its closed form, the refusals, and a `dpmjax finetune --method lmd` run on a tiny VAE."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.methods import lmd

SMALL = dict(patch_size=1, hidden_size=16, depth=2, num_heads=2, decoder_hidden_size=8, decoder_depth=1,
             decoder_num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory):
    from dpmjax.train.loop import train

    config = load_config(os.path.join(configs_dir(), "vae_fashion_mnist.py") + ":digits,runlocal")
    with config.unlocked():
        config.train.update(num_steps=2, log_every=1, checkpoint_every=2)
    workdir = str(tmp_path_factory.mktemp("vae"))
    train(config, workdir, quiet=True)
    return workdir


def test_schedules_follow_the_official_formulas():
    K = 600
    ratio = lambda s, name: float(lmd.mask_ratio(s, K, name))  # noqa: E731
    for name in ("linear", "piecewise", "cosine"):
        values = [ratio(s, name) for s in range(0, K + 1, 10)]
        assert values[0] == pytest.approx(0.15, abs=1e-6) and values[-1] == pytest.approx(0.75, abs=1e-6), name
        assert np.all(np.diff(values) >= -1e-6), name  # simple to hard: never decreasing
    assert ratio(300, "linear") == pytest.approx(0.45, abs=1e-6)
    # piecewise: 0.40 at K/6 and still at K/3, 0.75 from 2K/3 on, linear in between
    assert ratio(100, "piecewise") == pytest.approx(0.40, abs=1e-6)
    assert ratio(200, "piecewise") == pytest.approx(0.40, abs=1e-6)
    assert ratio(300, "piecewise") == pytest.approx(0.575, abs=1e-6)
    assert ratio(400, "piecewise") == pytest.approx(0.75, abs=1e-6)
    # cosine: the official y over S = 2K/3 steps, then 0.75
    S, s = 400, 150
    cos2 = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ratio(s, "cosine") == pytest.approx(0.15 + 0.60 * (1 - cos2(s / S) / cos2(0.0)), abs=1e-6)
    assert ratio(400, "cosine") == pytest.approx(0.75, abs=1e-6) and ratio(500, "cosine") == pytest.approx(0.75)
    assert ratio(0, "fixed") == ratio(K, "fixed") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="mask schedule must be one of"):
        lmd.mask_ratio(0, K, "exponential")


def test_random_mask_counts_and_one_program_for_every_ratio():
    fn = jax.jit(lambda key, ratio: lmd.random_patch_mask(key, 4, 49, ratio))
    for r, expected in ((0.15, 7), (0.5, 24), (0.75, 37)):  # round(r N); 24.5 rounds half to even
        masked = np.asarray(fn(jax.random.key(0), jnp.float32(r)))
        assert masked.shape == (4, 49) and (masked.sum(axis=1) == expected).all(), r
    assert fn._cache_size() == 1  # the ratio is data: the curriculum never recompiles
    rows = np.asarray(fn(jax.random.key(1), jnp.float32(0.5)))
    assert not (rows == rows[0]).all()  # independent masks per sample


def test_masked_encoder_equals_the_literal_mae_encoder_on_visible_tokens():
    """Masked tokens out of the keys == MAE's encoder on the gathered visible tokens (the fixed-shape claim)."""
    module = lmd.MaskedAutoencoder(latent_shape=(4, 4, 2), **SMALL)
    latents = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    masked = lmd.random_patch_mask(jax.random.key(1), 3, 16, 0.75)
    params = jax.jit(module.init)(jax.random.key(2), latents, masked)  # jitted: eager flax runs op by op
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), params)
    encode = jax.jit(lambda p, z, m: module.apply(p, z, m, method=lmd.MaskedAutoencoder.encode))
    full = encode(params, latents, masked)
    visible_index = jnp.argsort(masked, axis=1, stable=True)[:, :4]  # the 4 visible positions, ascending
    literal = jax.jit(lambda p, z, i: module.apply(p, z, i, method=lmd.MaskedAutoencoder.encode_visible_only))(
        params, latents, visible_index)
    np.testing.assert_allclose(jnp.take_along_axis(full, visible_index[:, :, None], axis=1), literal, atol=2e-5)
    # and the masked tokens' content cannot leak: changing the latents there leaves the visible outputs unchanged
    noise = jnp.where(lmd.unpatchify(masked[:, :, None].astype(jnp.float32) * jnp.ones((1, 1, 2)), (4, 4, 2), 1) > 0,
                      10.0, 0.0)
    moved = encode(params, latents + noise, masked)
    np.testing.assert_allclose(jnp.take_along_axis(moved, visible_index[:, :, None], axis=1), literal, atol=2e-5)


def test_loss_counts_masked_patches_only():
    module = lmd.MaskedAutoencoder(latent_shape=(4, 4, 2), **SMALL)
    latents = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
    masked = lmd.random_patch_mask(jax.random.key(1), 2, 16, 0.5)
    params = jax.jit(module.init)(jax.random.key(2), latents, masked)
    loss, _ = jax.jit(lambda p: lmd.masked_patch_loss(module, p, latents, masked))(params)
    pred = np.asarray(jax.jit(module.apply)(params, latents, masked))
    target = np.asarray(lmd.patchify(latents, 1))
    m = np.asarray(masked)
    expected = np.mean(((pred - target) ** 2).mean(-1)[m])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    recon = jax.jit(lambda p: lmd.reconstruct(module, p, latents, masked))(params)
    keep = ~np.asarray(lmd.unpatchify(jnp.broadcast_to(masked[:, :, None], (2, 16, 2)), (4, 4, 2), 1))
    np.testing.assert_array_equal(np.asarray(recon)[keep], np.asarray(latents)[keep])  # visible patches untouched


def test_replacement_inpainting_follows_its_closed_form():
    """DDIM with x0 replacement: the known entries end at alpha_e z + sigma_e (x_T - alpha_T z) / sigma_T exactly
    (the noise of x_T carried along), whatever the network says; the unknown entries are the network's."""
    import dpmjax
    from dpmjax.schedules import schedule_from_name

    schedule = schedule_from_name("linear")
    known = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
    mask = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1)) < 0.5
    x_T = jax.random.normal(jax.random.key(2), known.shape)
    model_fn = lambda x, t: jnp.tanh(x) * 0.3  # noqa: E731  any eps network
    fn = lmd.replacement_model_fn(model_fn, schedule, known, mask, "eps")
    times = dpmjax.time_grid(schedule, 6, "time_uniform")
    out = dpmjax.sample(fn, x_T, schedule=schedule, solver="ddim", timesteps=times, prediction="x0")
    t_T, t_e = times[0], times[-1]
    closed = schedule.alpha(t_e) * known + schedule.sigma(t_e) * (x_T - schedule.alpha(t_T) * known) / schedule.sigma(t_T)
    mask_b = np.broadcast_to(np.asarray(mask), known.shape)
    np.testing.assert_allclose(np.asarray(out)[mask_b], np.asarray(closed)[mask_b], atol=1e-4)


def _config(**method):
    config = load_config(os.path.join(configs_dir(), "methods", "lmd.py") + ":runlocal")
    with config.unlocked():
        config.method.update(method)
    return config


def test_validate_refuses_bad_ratios_and_teachers(vae_workdir):
    from dpmjax.methods import finetune
    from dpmjax.workdir import load_teacher

    teacher = load_teacher(vae_workdir)
    for name, value in (("start_ratio", 0.0), ("end_ratio", 1.0), ("end_ratio", 1.5)):
        with pytest.raises(ValueError, match=rf"config.method.{name} is a mask ratio and must be in \(0, 1\)"):
            lmd.validate(_config(**{name: value}), teacher)
    with pytest.raises(ValueError, match="config.method.schedule must be one of"):
        lmd.validate(_config(schedule="step"), teacher)
    with pytest.raises(ValueError, match="config.method.patch_size=3 does not divide"):
        lmd.validate(_config(patch_size=3), teacher)
    with pytest.raises(ValueError, match="masks the latents of a VAE"):
        lmd.validate(_config(), teacher.__class__(**{**teacher.__dict__, "config": _unet_config()}))
    with pytest.raises(ValueError, match="config.method.end_ratio"):  # through the loop: before anything is written
        finetune("lmd", teacher, _config(end_ratio=0.0), str(os.path.join(vae_workdir, "..", "never")))


def _unet_config():
    return load_config(os.path.join(configs_dir(), "digits.py") + ":runlocal")


def test_finetune_run_rises_the_ratio_and_loads(vae_workdir, tmp_path):
    from dpmjax.main import main

    workdir = str(tmp_path / "lmd")
    config_file = os.path.join(configs_dir(), "methods", "lmd.py") + ":runlocal,schedule=linear"
    assert main(["finetune", "--method", "lmd", "--teacher", vae_workdir, "--workdir", workdir, "--config",
                 config_file]) == 0
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    ratios = [row["mask_ratio"] for row in rows]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1] < 0.75, ratios
    module, params, scale, _ = lmd.load_lmd(workdir)
    assert scale > 0 and module.latent_shape == (4, 4, 2)
    latents = jnp.zeros((2, 4, 4, 2))
    assert lmd.pooled_features(module, params, latents).shape == (2, 16)
    assert main(["sample", "--workdir", workdir, "--num", "4"]) == 2  # refused: an LMD workdir holds no sampler
