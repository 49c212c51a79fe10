"""diffusers UNet2DModel -> dpmjax: outputs match diffusers' torch model, the scheduler maps to the same
alphas_cumprod, sampling matches DPMSolverMultistepScheduler, the CLI works, and bad input is named.

This file needs torch and diffusers (skipped without them); the torch-free conversion tests (bad folders and
configs, non-finite weights, the CLI on a numpy-written safetensors folder) live in ``test_convert_cli.py``.

The oracle is diffusers itself: UNet2DModels with seeded random weights, saved with ``save_pretrained``.
Channels are shrunk (the CPU is slow at convolutions); block types, levels, layers per block, attention
placement and every other config value of google/ddpm-cifar10-32 are kept.
"""
import inspect
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import dpmjax  # noqa: E402
from dpmjax.main import main  # noqa: E402
from dpmjax.metrics.weights import UnsafeCheckpointError  # noqa: E402
from dpmjax.nn.diffusers_unet import UNET2D_DEFAULTS  # noqa: E402
from dpmjax.convert import ConversionError, convert_diffusers, schedule_from_diffusers  # noqa: E402
from dpmjax.workdir import load_for_sampling  # noqa: E402
from tiny_configs import leftovers, model_folder  # noqa: E402  (tests/tiny_configs.py)

# google/ddpm-cifar10-32's config.json (diffusers 0.0.4 era: keys added later take today's defaults), with
# block_out_channels (128, 256, 256, 256) shrunk 4x.
CIFAR10_LAYOUT = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "block_out_channels": [32, 64, 64, 64],
    "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# Attention at two resolutions (16 and 8) and the other code paths: scale-shift norm (mid attention without
# GroupNorm), resnet up/down sampling, flipped embedding, centred input, mid scale factor, multi-head attention.
SMALL_LAYOUT = {
    "sample_size": 16, "block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"), "attention_head_dim": 8,
    "resnet_time_scale_shift": "scale_shift", "downsample_type": "resnet", "upsample_type": "resnet",
    "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": True, "mid_block_scale_factor": 2 ** 0.5,
}
SMALL_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 500, "beta_schedule": "scaled_linear",
                   "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"}


def random_unet(config, seed):
    """A UNet2DModel with seeded weights of a visible scale (the default init zeroes nothing, but perturb
    every tensor so that norms' scales, biases and all projections matter)."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def torch_forward(model, x_nhwc, k):
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2), torch.from_numpy(np.asarray(k))).sample
    return out.permute(0, 2, 3, 1).numpy()


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """The CIFAR-10-layout model saved as a pre-0.14 checkpoint: safetensors with the old attention names."""
    folder = tmp_path_factory.mktemp("cifar") / "ddpm-cifar10-32"
    model = random_unet(CIFAR10_LAYOUT, 0)
    model.save_pretrained(folder)
    from safetensors.numpy import load_file, save_file
    path = str(folder / "diffusion_pytorch_model.safetensors")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(path).items():
        for new, legacy in old.items():
            key = key.replace(f".{new}.", f".{legacy}.")
        state[key] = value
    save_file(state, path)
    with open(folder / "config.json", "w") as f:  # the hub file: old keys only
        json.dump({**CIFAR10_LAYOUT, "_diffusers_version": "0.0.4"}, f)
    with open(folder / "scheduler_config.json", "w") as f:
        json.dump({"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                   "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
                   "variance_type": "fixed_small"}, f)
    return model, folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small model as a pipeline folder (unet/ as a torch .bin, scheduler/)."""
    folder = tmp_path_factory.mktemp("small") / "pipeline"
    model = random_unet(SMALL_LAYOUT, 1)
    model.save_pretrained(folder / "unet", safe_serialization=False)
    os.makedirs(folder / "scheduler")
    with open(folder / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(SMALL_SCHEDULER, f)
    with open(folder / "model_index.json", "w") as f:
        json.dump({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                   "scheduler": ["diffusers", "DDPMScheduler"]}, f)
    return model, folder


def test_defaults_are_diffusers_unet2dmodel_defaults():
    signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    expected = {k: p.default for k, p in signature.items() if k != "self"}
    assert set(expected) == set(UNET2D_DEFAULTS)
    for key, value in expected.items():
        assert (tuple(value) if isinstance(value, (list, tuple)) else value) == UNET2D_DEFAULTS[key], key


def test_cifar10_layout_matches_diffusers(cifar, tmp_path):
    model, folder = cifar
    assert (folder / "diffusion_pytorch_model.bin").exists() is False
    out = convert_diffusers(str(folder), str(tmp_path / "converted"), log=lambda *_: None)
    model_fn, schedule, config = load_for_sampling(out)
    assert config.train.target == "eps" and schedule.num_train_timesteps == 1000
    x = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    k = np.array([0, 421, 999])
    ours = jax.jit(model_fn)(jnp.asarray(x), jnp.asarray((k + 1) / 1000.0, jnp.float32))
    assert rel_err(ours, torch_forward(model, x, k)) < 1e-4  # float32 on both sides


def test_small_model_bin_matches_diffusers_and_samples_like_dpm_solver_multistep(small, tmp_path):
    model, folder = small
    out = convert_diffusers(str(folder), str(tmp_path / "converted"), log=lambda *_: None)
    model_fn, schedule, config = load_for_sampling(out)
    assert config.train.target == "v" and schedule.num_train_timesteps == 500
    x = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
    k = np.array([3, 377])  # N = 500: dpmjax time (k + 1) / 500 is diffusers' timestep k
    ours = jax.jit(model_fn)(jnp.asarray(x), jnp.asarray((k + 1) / 500.0, jnp.float32))
    assert rel_err(ours, torch_forward(model, x, k)) < 1e-4

    # The whole sampler on the converted model: diffusers' DPMSolverMultistepScheduler (dpmsolver++, 2M,
    # linspace, sigma = 0 end) on the torch model vs dpmjax's dpmpp_2m on the converted one.
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        {**SMALL_SCHEDULER, "algorithm_type": "dpmsolver++", "solver_order": 2})
    scheduler.set_timesteps(4)
    sample = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            sample = scheduler.step(model(sample, timestep).sample, timestep, sample).prev_sample
    expected = sample.permute(0, 2, 3, 1).numpy()
    sampler = dpmjax.make_sampler(model_fn, schedule=schedule, solver="dpmpp_2m", nfe=4, spacing="linspace",
                                  final_sigma="zero", prediction=config.train.target)  # dpmjax.sample, jitted
    x0 = sampler(jnp.asarray(x))
    # float32 networks fed k as an integer (torch) vs 500 (t - 1/N) in float32 (ours): ~1e-6 apart per call
    assert rel_err(x0, expected) < 1e-4


@pytest.mark.parametrize("scheduler", [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 400},
    {"trained_betas": list(np.linspace(1e-4, 0.05, 300)), "num_train_timesteps": 300},
])
def test_scheduler_mapping_reproduces_alphas_cumprod(scheduler):
    reference = diffusers.DDPMScheduler(**scheduler)
    schedule, prediction, _ = schedule_from_diffusers(dict(reference.config))
    assert prediction == "eps"
    np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.double().numpy(), rtol=1e-6)
    for given, ours in (("v_prediction", "v"), ("sample", "x0"), ("epsilon", "eps")):
        assert schedule_from_diffusers({**scheduler, "prediction_type": given})[1] == ours


def test_cli_converts_and_samples(small, tmp_path, capsys):
    _, folder = small
    out = tmp_path / "cli"
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "checkpoints" / "0").is_dir()
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(out)]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err
    npz = tmp_path / "samples.npz"
    assert main(["sample", "--workdir", str(out), "--solver", "dpmpp_2m", "--nfe", "3", "--num", "2",
                 "--out", str(npz)]) == 0
    images = np.load(npz)["images"]
    assert images.shape == (2, 16, 16, 3) and np.all(np.isfinite(images))


# ------------------------------------------------------------------------------------------------ bad input

_leftovers, _model_folder = leftovers, model_folder


def test_shape_mismatch_and_missing_tensors_are_named(small, tmp_path):
    model, _ = small
    from safetensors.numpy import save_file
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["down_blocks.0.resnets.0.conv1.weight"] = np.zeros((8, 16, 3, 3), np.float32)  # is (16, 16, 3, 3)
    del state["mid_block.attentions.0.to_q.bias"]
    folder = _model_folder(tmp_path, {"_class_name": "UNet2DModel", **SMALL_LAYOUT})
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError) as err:
        convert_diffusers(str(folder), str(tmp_path / "out"))
    assert "down_blocks.0.resnets.0.conv1.weight" in str(err.value)
    assert "mid_block/attentions_0/to_q/bias" in str(err.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_bin_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (shutil.copy, (__file__, str(marker)))

    folder = _model_folder(tmp_path, {**CIFAR10_LAYOUT}, name="diffusion_pytorch_model.bin")
    torch.save({"conv_in.weight": Payload()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="shutil.copy"):
        convert_diffusers(str(folder), str(tmp_path / "out"))
    assert not marker.exists() and not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(tmp_path / "out")]) == 2
