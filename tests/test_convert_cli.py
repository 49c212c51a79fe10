"""diffusers -> dpmjax conversion without torch: bad input is named, NaN / inf weights are refused naming the
tensor, and the CLI converts a safetensors folder written with numpy alone.

These tests need neither torch nor diffusers (``tests/test_convert.py`` holds the parity tests against
diffusers' torch model and skips without torch): a clean CI machine runs them all.
"""
import json
import re

import jax
import numpy as np
import pytest

from dpmjax.main import main
from dpmjax.nn.diffusers_unet import DiffusersUNet2D, UnsupportedConfigError, normalize_config
from dpmjax.convert import ConversionError, abstract_params, convert_diffusers, schedule_from_diffusers
from dpmjax.workdir import load_params
from tiny_configs import leftovers, model_folder  # noqa: E402  (tests/tiny_configs.py)

# A small but complete UNet2DModel layout (attention in one level, resnet blocks, GroupNorm of 4 groups).
TINY_LAYOUT = {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
               "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
               "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
               "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8}
# google/ddpm-cifar10-32's block layout (for the unsupported-blocks test; no weights are read).
CIFAR10_BLOCKS = {"_class_name": "UNet2DModel", "block_out_channels": [32, 64, 64, 64], "in_channels": 3,
                  "out_channels": 3, "sample_size": 32, "layers_per_block": 2, "norm_num_groups": 32,
                  "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                  "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


_leftovers, _model_folder = leftovers, model_folder


def torch_layout_weights(layout, seed=0):
    """A UNet2DModel state dict for ``layout`` in diffusers' names and torch layouts (OIHW convs, [out, in]
    linears, GroupNorm ``weight``), generated from the port's parameter shapes with numpy alone. (Names such as
    diffusers' ``linear_1`` come out as ``linear.1``: the converter maps both to the same parameter.)"""
    fields = normalize_config(layout)
    model = DiffusersUNet2D(**fields)
    shape = (fields["sample_size"], fields["sample_size"], fields["in_channels"])
    rng = np.random.default_rng(seed)
    state = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(abstract_params(model, shape)["params"])[0]:
        names = [entry.key for entry in path]
        module = ".".join(re.sub(r"_(\d+)$", r".\1", name) for name in names[:-1])  # down_blocks_1 -> down_blocks.1
        dims = tuple(spec.shape)
        torch_shape = (dims[3], dims[2], dims[0], dims[1]) if len(dims) == 4 else dims[::-1]
        state[f"{module}.{'bias' if names[-1] == 'bias' else 'weight'}"] = \
            rng.normal(0.0, 0.05, torch_shape).astype(np.float32)
    return state


def safetensors_folder(tmp_path, state, scheduler=None):
    from safetensors.numpy import save_file
    folder = _model_folder(tmp_path, TINY_LAYOUT)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    if scheduler is not None:
        with open(folder / "scheduler_config.json", "w") as f:
            json.dump(scheduler, f)
    return folder


def test_the_cli_converts_a_numpy_written_safetensors_folder(tmp_path, capsys):
    state = torch_layout_weights(TINY_LAYOUT)
    folder = safetensors_folder(tmp_path, state, {"_class_name": "DDPMScheduler", "num_train_timesteps": 100,
                                                  "prediction_type": "v_prediction"})
    out = tmp_path / "converted"
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(out)]) == 0
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(out)]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err
    _, variables, schedule, config = load_params(str(out))
    assert config.train.target == "v" and schedule.num_train_timesteps == 100
    conv = np.asarray(variables["params"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"])
    np.testing.assert_array_equal(conv, state["down_blocks.0.resnets.0.conv1.weight"].transpose(2, 3, 1, 0))
    scale = np.asarray(variables["params"]["conv_norm_out"]["scale"])
    np.testing.assert_array_equal(scale, state["conv_norm_out.weight"])


def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path, capsys):
    state = torch_layout_weights(TINY_LAYOUT)
    state["down_blocks.0.resnets.0.conv1.weight"][0, 0, 1, 1] = np.nan
    state["conv_in.bias"][3] = np.inf
    folder = safetensors_folder(tmp_path, state)
    with pytest.raises(ConversionError, match=r"non-finite weights in 2 tensor\(s\): "
                                              r"conv_in.bias \(0 NaN, 1 inf of 8 values\); "
                                              r"down_blocks.0.resnets.0.conv1.weight \(1 NaN, 0 inf of 576 values\)"):
        convert_diffusers(str(folder), str(tmp_path / "out"), log=lambda *_: None)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "down_blocks.0.resnets.0.conv1.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_not_a_unet2dmodel_is_refused(tmp_path):
    folder = _model_folder(tmp_path, {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768})
    with pytest.raises(UnsupportedConfigError, match="UNet2DConditionModel"):
        convert_diffusers(str(folder), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="not a diffusers model folder"):
        convert_diffusers(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_unsupported_blocks_and_options_are_named(tmp_path):
    config = {**CIFAR10_BLOCKS, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "SkipDownBlock2D",
                                                     "DownBlock2D"], "time_embedding_type": "fourier"}
    folder = _model_folder(tmp_path, config)
    with pytest.raises(UnsupportedConfigError) as err:
        convert_diffusers(str(folder), str(tmp_path / "out"))
    for name in ("CrossAttnDownBlock2D", "SkipDownBlock2D", "fourier"):
        assert name in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedConfigError, match="rescale_betas_zero_snr"):
        schedule_from_diffusers({"rescale_betas_zero_snr": True})
    with pytest.raises(UnsupportedConfigError, match="sigmoid"):
        schedule_from_diffusers({"beta_schedule": "sigmoid"})
