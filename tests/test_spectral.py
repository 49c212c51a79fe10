"""Spectral Diffusion (dpmjax/nn/wavelets.py WG blocks, the UNet's wavelet_gating option, dpmjax/metrics/spectrum.py,
dpmjax/methods/spectral_distill.py): the inverse Haar DWT, the gated blocks against hand oracles, the UNet default
unchanged, odd sizes refused, the radial spectrum of a cosine, the frequency weight, the distillation losses'
identities, the CLI run and the accelerator config's shapes."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.methods import spectral_distill
from dpmjax.metrics.spectrum import radial_bins, radial_power_spectrum, spectrum_error
from dpmjax.nn import UNet
from dpmjax.nn.wavelets import WGDown, WGUp, haar_dwt, haar_idwt

CONFIG = os.path.join(configs_dir(), "methods", "spectral_distill.py")


def method_config(variant="runlocal", **method):
    config = load_config(CONFIG + ":" + variant)
    with config.unlocked():
        for name, value in method.items():
            config.method[name] = value
    return config


def test_haar_idwt_inverts_the_dwt_exactly():
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
    np.testing.assert_allclose(haar_idwt(*haar_dwt(x)), x, atol=1e-6)  # float32 sums of 4 terms: a few ulps
    bands = [jax.random.normal(jax.random.key(i), (2, 3, 4, 5)) for i in range(4)]
    for got, want in zip(haar_dwt(haar_idwt(*bands)), bands):  # and the other way round (orthonormal)
        np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        haar_idwt(bands[0], bands[1], bands[2], bands[3][:, :2])


def _force_gates(variables, logit):
    """The gates' output layer set to a constant logit: every gate sigmoid(logit)."""
    gates = dict(variables["params"]["gates"])
    gates["fc2"] = {"kernel": jnp.zeros_like(gates["fc2"]["kernel"]),
                    "bias": jnp.full_like(gates["fc2"]["bias"], logit)}
    return {"params": {**variables["params"], "gates": gates}}


def test_wg_down_with_open_gates_is_the_sum_of_the_sub_bands():
    """g = 1: X' = LL + LH + HL + HH = 2 d (d the bottom-right pixel of each 2x2 block, by the Haar formulas)."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    block = WGDown(4)
    variables = block.init(jax.random.key(2), x)
    assert "conv" not in variables["params"]  # same width: no conv, only the gates
    out = block.apply(_force_gates(variables, 40.0), x)  # sigmoid(40) = 1 in float32
    np.testing.assert_allclose(out, sum(haar_dwt(x)), atol=1e-5)
    np.testing.assert_allclose(out, 2 * x[:, 1::2, 1::2], atol=1e-5)
    half = block.apply(variables, x)  # at init fc2 = 0: every gate is 1/2
    np.testing.assert_allclose(half, 0.5 * out, atol=1e-5)
    assert WGDown(6).apply(WGDown(6).init(jax.random.key(2), x), x).shape == (2, 4, 4, 6)


def test_wg_up_with_open_gates_is_the_inverse_dwt_of_the_channel_chunks():
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 12))
    block = WGUp(3)  # 12 = 4 x 3 channels: no conv, the chunks are the sub-bands
    variables = block.init(jax.random.key(4), x)
    assert "conv" not in variables["params"]
    out = block.apply(_force_gates(variables, 40.0), x)
    chunks = x.reshape(2, 4, 4, 4, 3)
    np.testing.assert_allclose(out, haar_idwt(*(chunks[:, :, :, i] for i in range(4))), atol=1e-5)
    assert WGUp(5).apply(WGUp(5).init(jax.random.key(4), x), x).shape == (2, 8, 8, 5)


def _unet(**fields):
    return UNet(model_channels=8, channel_mult=(1, 2), num_groups=4, mid_attention=False, **fields)


def test_the_unet_default_is_unchanged_and_wavelet_gating_swaps_the_resampling():
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
    t = jnp.array([10.0, 500.0])
    plain, default = _unet(), _unet(wavelet_gating=False)
    variables = plain.init(jax.random.key(6), x, t)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, default.init(jax.random.key(6), x, t))
    # the resampling modules are still the stride-2 / nearest + 3x3 convs (Downsample / Upsample)
    assert jax.tree.map(jnp.shape, variables["params"]["down_0_sample"]) == \
        {"conv": {"bias": (8,), "kernel": (3, 3, 8, 8)}}
    assert jax.tree.map(jnp.shape, variables["params"]["up_1_sample"]) == \
        {"conv": {"bias": (16,), "kernel": (3, 3, 16, 16)}}
    variables = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(7), a.shape), variables)
    np.testing.assert_array_equal(plain.apply(variables, x, t), default.apply(variables, x, t))
    gated = _unet(wavelet_gating=True)
    wg_vars = gated.init(jax.random.key(6), x, t)
    assert set(wg_vars["params"]["down_0_sample"]) == {"gates"}
    assert set(wg_vars["params"]["up_1_sample"]) == {"conv", "gates"}
    out = gated.apply(jax.tree.map(lambda a: a + 0.01, wg_vars), x, t)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


def test_odd_sizes_are_refused_naming_the_option(digits_teacher):
    with pytest.raises(ValueError, match="model.wavelet_gating"):
        _unet(wavelet_gating=True).init(jax.random.key(0), jnp.zeros((1, 7, 8, 1)), jnp.zeros((1,)))
    _unet().init(jax.random.key(0), jnp.zeros((1, 7, 8, 1)), jnp.zeros((1,)))  # the strided conv rounds up
    _, teacher = digits_teacher
    deep = dict(load_config(CONFIG + ":runlocal").method.student_model, channel_mult=(1, 1, 1, 1, 1))  # 8,4,2,1 -> odd
    with pytest.raises(ValueError, match=r"student_model.*model.wavelet_gating.*1x1 at level 3"):
        spectral_distill.validate(method_config(student_model=deep), teacher)


@pytest.mark.parametrize("method, message", [
    ({"student_model": None}, "student_model must be a model section"),
    ({"student_model": {"kind": "dit"}}, "kind 'unet'"),
    ({"student_model": {"kind": "unet", "widht": 3}}, "student_model: .*widht"),
    ({"lambda_freq": -0.1}, "lambda_freq must be a finite number >= 0"),
    ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"beta": 1.0}, "unknown spectral_distill settings"),
])
def test_bad_settings_fail_before_compiling(digits_teacher, tmp_path, method, message):
    import dpmjax.methods

    _, teacher = digits_teacher
    with pytest.raises(ValueError, match=message):
        dpmjax.methods.finetune("spectral_distill", teacher, method_config(**method), str(tmp_path / "out"),
                                num_devices=1)
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_radial_spectrum_of_a_cosine_is_one_bin():
    """cos(2 pi 2 x / 8) has its power at (ky, kx) = (0, +-2): radius 2 only, total power = mean of cos^2 = 1/2 per
    pixel, i.e. 64 / 2 = 32 in the orthonormal DFT, split over the 2 coefficients and averaged over the bin's 8."""
    columns = np.cos(2 * np.pi * 2 * np.arange(8) / 8)
    image = np.broadcast_to(columns, (8, 8))[None, :, :, None]
    profile = radial_power_spectrum(image)
    counts = np.bincount(radial_bins(8, 8).ravel())
    assert len(profile) == 7 and counts.sum() == 64
    np.testing.assert_allclose(profile[2] * counts[2], 32.0, rtol=1e-12)
    np.testing.assert_allclose(np.delete(profile, 2), 0.0, atol=1e-20)
    same = spectrum_error(np.tile(image, (3, 1, 1, 1)), image)
    assert same["spectrum_error"] == pytest.approx(0.0, abs=1e-9)
    noise = np.random.default_rng(0).normal(size=(400, 8, 8, 1))
    white = spectrum_error(noise, noise[:, ::-1])  # same statistics: white noise, every radius ~1
    assert white["spectrum_error"] < 0.1 and white["hf_from"] == 3
    blurred = spectrum_error(0.5 * (noise + np.roll(noise, 1, axis=2)), noise)  # a low-pass: high frequencies missing
    assert blurred["hf_log_ratio"] < -0.3 and blurred["hf_share_samples"] < blurred["hf_share_data"]


def test_the_frequency_weight_is_the_normalised_inverse_amplitude():
    x0 = jax.random.uniform(jax.random.key(8), (2, 8, 8, 3), minval=-1, maxval=1)
    weight = spectral_distill.frequency_weight(x0, (8, 8), alpha=-1.0, eps=0.05)
    amplitude = np.abs(np.fft.fft2(np.asarray(x0, np.float64), axes=(1, 2), norm="ortho")).mean(-1, keepdims=True)
    oracle = 1.0 / (amplitude + 0.05 * amplitude.mean(axis=(1, 2), keepdims=True))
    oracle /= oracle.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(weight, oracle, rtol=1e-4)  # float32 FFT
    np.testing.assert_allclose(jnp.mean(weight, axis=(1, 2)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(spectral_distill.frequency_weight(x0, (4, 4), alpha=0.0), 1.0, rtol=1e-6)
    assert spectral_distill.frequency_weight(x0, (4, 4)).shape == (2, 4, 4, 1)


def test_the_distillation_losses_vanish_for_a_matching_student_and_agree_by_parseval():
    keys = jax.random.split(jax.random.key(9), 4)
    teacher = {8: jax.random.normal(keys[0], (2, 8, 8, 6)), 4: jax.random.normal(keys[1], (2, 4, 4, 10))}
    student = {8: jax.random.normal(keys[2], (2, 8, 8, 3)), 4: jax.random.normal(keys[3], (2, 4, 4, 5))}
    identity = {"8": {"kernel": jnp.eye(6), "bias": jnp.zeros(6)}, "4": {"kernel": jnp.eye(10), "bias": jnp.zeros(10)}}
    x0 = jax.random.normal(keys[0], (2, 8, 8, 1))
    spatial, freq = spectral_distill.spectral_losses(teacher, teacher, identity, x0, alpha=-1.0, eps=0.05)
    assert float(spatial) == pytest.approx(0.0, abs=1e-10) and float(freq) == pytest.approx(0.0, abs=1e-10)
    proj = {"8": {"kernel": jnp.ones((3, 6)), "bias": jnp.zeros(6)}, "4": {"kernel": jnp.ones((5, 10)), "bias": jnp.ones(10)}}
    spatial, freq = spectral_distill.spectral_losses(teacher, student, proj, x0, alpha=0.0, eps=0.05)
    np.testing.assert_allclose(freq, spatial, rtol=1e-4)  # w = 1: the orthonormal DFT preserves the squared error
    energy = {s: np.mean(np.asarray(teacher[s]) ** 2) for s in teacher}
    manual = sum(np.mean((np.asarray(teacher[s]) - np.asarray(student[s]) @ np.asarray(proj[str(s)]["kernel"])
                          - np.asarray(proj[str(s)]["bias"])) ** 2) / energy[s] for s in teacher)
    np.testing.assert_allclose(spatial, manual, rtol=1e-4)


def test_finetune_cli_then_sample_the_student(digits_teacher, tmp_path):
    from dpmjax.main import main

    teacher_dir, _ = digits_teacher
    out = str(tmp_path / "slim")
    assert main(["finetune", "--method", "spectral_distill", "--teacher", teacher_dir, "--workdir", out,
                 "--num-devices", "1", "--config", CONFIG + ":runlocal"]) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(lines) == 2 and all(line["spatial"] > 0 and line["freq"] > 0 for line in lines)
    model = json.load(open(os.path.join(out, "config.json")))["model"]
    assert model["wavelet_gating"] is True and model["model_channels"] == 4  # the student, not the teacher
    student = load_config(CONFIG + ":runlocal").method.student_model.to_dict()
    assert set(model) == set(student)  # the student's section replaces the teacher's: no teacher field leaks in
    assert main(["sample", "--workdir", out, "--num", "4", "--batch-size", "4"]) == 0
    written = [f for f in os.listdir(out) if f.startswith("samples_") and f.endswith(".npz")]
    assert len(written) == 1


def test_the_accelerator_config_distils_the_converted_ddpm_cifar10_teacher():
    """configs/methods/spectral_distill_cifar10.py validates, builds and traces one update (shapes only) on a
    teacher with google/ddpm-cifar10-32's layout; all four resolutions are matched."""
    from tiny_configs import ddpm_cifar10_teacher

    from dpmjax.methods import get_method

    teacher = ddpm_cifar10_teacher()
    config = load_config(os.path.join(configs_dir(), "methods", "spectral_distill_cifar10.py"))
    method = get_method("spectral_distill")
    method.validate(config, teacher)
    program = method.build(config, teacher)
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    assert sorted(int(s) for s in state.params["proj"]) == [4, 8, 16, 32]
    batch = {"image": jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((4,), jnp.int32)}
    new, scalars = jax.eval_shape(program.update, state, batch, program.frozen, jax.random.key(1))
    assert jax.tree.map(lambda s: s.shape, new) == jax.tree.map(lambda s: s.shape, state)
    assert scalars["loss"].shape == () and program.output["model"]["model_channels"] == 48
