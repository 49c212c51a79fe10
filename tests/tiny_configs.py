"""Small training configs and file fixtures shared by several test modules (not collected: no ``test_`` prefix).

Building the same config in every module lets one compiled train step serve them all in one process.
"""
import json
import os

from dpmjax.config import configs_dir, load_config


def tiny_unet_config(**train_overrides):
    """A ~10k-parameter UNet on 8x8 digits, 4 steps at batch 16; 16 channels give array chunks of several KB in
    the checkpoint files."""
    config = load_config(os.path.join(configs_dir(), "digits.py"))
    with config.unlocked():
        config.model.update(model_channels=16, channel_mult=(1,), num_res_blocks=1, mid_attention=False,
                            num_groups=4)
        config.data.batch_size = 16
        config.optim.update(learning_rate=1e-3, warmup_steps=0, decay="constant")
        # pinned, not the quickstart default's (v since 2026-12-06): the loss thresholds of the tests are eps's
        config.train.update({"num_steps": 4, "log_every": 2, "checkpoint_every": 2, "target": "eps",
                             **train_overrides})
    return config


def tiny_dit_config(*, num_steps, checkpoint_every, sharding="replicate"):
    """A one-block DiT on 8x8 digits, logging every step: most of its bytes sit in dense kernels that fsdp can
    split 8 ways."""
    config = load_config(os.path.join(configs_dir(), "digits.py"))
    with config.unlocked():
        config.model = dict(kind="dit", patch_size=2, hidden_size=64, depth=1, num_heads=2, freq_dim=64,
                            bfloat16=False)
        config.data.batch_size = 16
        config.optim.update(learning_rate=1e-3, warmup_steps=0, decay="constant")
        config.train.update(num_steps=num_steps, log_every=1, checkpoint_every=checkpoint_every, sharding=sharding)
    return config


def leftovers(parent):
    """Hidden (temporary) entries left in a folder."""
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


def model_folder(tmp_path, config, weights=b"", name="diffusion_pytorch_model.safetensors"):
    """A diffusers model folder: config.json and one weights file."""
    folder = tmp_path / "model"
    folder.mkdir()
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    (folder / name).write_bytes(weights)
    return folder


def teacher_config():
    """The shared method-test teacher: the tiny UNet trained 80 steps at batch 32 on 8x8 digits (eps)."""
    config = tiny_unet_config()
    with config.unlocked():
        config.data.batch_size = 32
        config.optim.update(learning_rate=3e-3)
        config.train.update(num_steps=80, log_every=40, checkpoint_every=80, ema_decay=0.9)
    return config


def diffusers_teacher(seed=0):
    """A Teacher whose network is the diffusers port (``kind="diffusers_unet"``, as ``dpmjax convert`` writes it):
    two levels of 16 / 32 channels and the mid block, no attention (compiles fast), seeded random weights, on
    the 8x8 digits schedule (eps). For the methods' support of converted teachers; no training, no torch."""
    import ml_collections

    from dpmjax.methods import Teacher
    from dpmjax.nn import build_model, init_params
    from dpmjax.schedules import schedule_from_config

    config = teacher_config()
    with config.unlocked():
        config.model = ml_collections.ConfigDict(dict(
            kind="diffusers_unet", sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, add_attention=False))
    model = build_model(config.model)
    return Teacher(model, init_params(model, config.data.image_shape, seed), schedule_from_config(config.schedule),
                   config)


def ddpm_cifar10_teacher():
    """An abstract Teacher (``jax.ShapeDtypeStruct`` params: no weights) with google/ddpm-cifar10-32's layout as
    ``dpmjax convert`` writes it (35.7M parameters, eps): for shape-only tests of the paper-scale configs."""
    from dpmjax.methods import abstract_teacher

    layout = {"act_fn": "silu", "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
              "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
              "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
              "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
              "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
    return abstract_teacher({"model": {"kind": "diffusers_unet", **layout},
                             "schedule": {"name": "linear", "num_train_timesteps": 1000},
                             "data": {"name": "tfds:cifar10", "image_shape": [32, 32, 3]}, "target": "eps"})
