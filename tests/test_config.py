"""Configs: every config builds on configs/common.py, variants parse like big_vision's ``parse_arg``,
overrides keep the default's type, and bad values fail at load time with the flag named (no model built)."""
import glob
import os
import shutil

import pytest

from dpmjax.config import ConfigError, configs_dir, load_config
from dpmjax.workdir import SAMPLE_DEFAULTS

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(configs_dir(), "*.py")))
SAMPLE_KEYS = {"solver", "nfe", "spacing", "guidance_scale", "num"}


def _common():
    return load_config("common.py")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_on_common_and_has_a_runlocal_variant(name):
    """Shared sections come from common.py (a config that forgot it would lack train.sharding / sample fields),
    the docstring carries the run command, and ``:runlocal`` shrinks it to a smoke run."""
    config, small = load_config(name), load_config(f"{name}:runlocal")
    assert config.train.sharding == "replicate"
    assert set(config.sample.keys()) == SAMPLE_KEYS
    assert set(config.train.keys()) >= set(_common().train.keys())
    assert set(config.optim.keys()) == set(_common().optim.keys())
    with open(os.path.join(configs_dir(), name)) as f:
        assert "dpmjax " in f.read().split('"""')[1], f"{name}: the docstring must say how to run it"
    if "num_steps" in small.train and name != "cifar10_ddpm_pretrained.py":  # a pretrained model is not trained
        assert small.train.num_steps <= 20 < config.train.num_steps
    if "batch_size" in small.data:
        assert small.data.batch_size <= 16
    assert small.sample.num <= 16 < config.sample.num
    assert small.model.kind == config.model.kind


def test_workdir_sample_defaults_match_common():
    """Workdirs without a sample section (converted folders, old runs) sample like a fresh common.py config."""
    assert dict(_common().sample) == SAMPLE_DEFAULTS


def test_variants_combine_and_reject_unknown_names():
    cond_small = load_config("digits.py:cond,runlocal")
    assert cond_small.model.num_classes == 10 and cond_small.train.num_steps <= 20
    assert cond_small.sample.guidance_scale == 2.0
    assert load_config("digits.py").model.get("num_classes") is None
    assert load_config("cifar10.py:v").train.target == "v"
    assert load_config("cifar10.py:v=false").train.target == "eps"
    with pytest.raises(ConfigError, match="--config digits.py:bogus.*unknown variant 'bogus'.*'cond', 'runlocal'"):
        load_config("digits.py:bogus")
    with pytest.raises(ConfigError, match="variant 'runlocal=3': expected true or false"):
        load_config("digits.py:runlocal=3")
    with pytest.raises(ConfigError, match="--config: no config file 'nope.py'"):
        load_config("nope.py")


@pytest.mark.parametrize("override, field, expected", [
    ("--config.train.num_steps=7", "train.num_steps", 7),
    ("--config.optim.learning_rate=1", "optim.learning_rate", 1.0),         # int -> float
    ("--config.optim.learning_rate=2e-4", "optim.learning_rate", 2e-4),
    ("--config.model.channel_mult=[1,2,2]", "model.channel_mult", (1, 2, 2)),  # list -> tuple
    ("--config.model.channel_mult=1,2", "model.channel_mult", (1, 2)),
    ("--config.model.attention_resolutions=[]", "model.attention_resolutions", ()),
    ("--config.model.bfloat16=true", "model.bfloat16", True),
    ("--config.model.mid_attention=0", "model.mid_attention", False),
    ("--config.train.target=v", "train.target", "v"),
    ("--config.data.name='digits'", "data.name", "digits"),
    ("--config.train.sharding=fsdp", "train.sharding", "fsdp"),
    ("--config.optim.grad_clip=None", "optim.grad_clip", None),                # NULLABLE: switched off
])
def test_overrides_keep_the_type_of_the_default(override, field, expected):
    config = load_config("digits.py", [override])
    section, name = field.split(".")
    value = config[section][name]
    assert value == expected and type(value) is type(expected)


def test_a_class_conditional_config_can_be_made_unconditional():
    config = load_config("fashion_mnist.py", ["--config.model.num_classes=None", "--config.model.label_dropout=0"])
    assert config.model.num_classes is None and config.model.label_dropout == 0.0
    with pytest.raises(ConfigError, match="--config.train.num_steps=None: expected an integer"):
        load_config("digits.py", ["--config.train.num_steps=None"])


def test_override_as_two_arguments():
    config = load_config("digits.py", ["--config.train.num_steps", "9", "--config.sample.nfe=4"])
    assert (config.train.num_steps, config.sample.nfe) == (9, 4)


@pytest.mark.parametrize("override, message", [
    ("--config.train.num_steps=abc", r"--config.train.num_steps=abc: expected an integer \(the default is 2000\)"),
    ("--config.train.num_steps=1.5", r"--config.train.num_steps=1.5: expected an integer"),
    ("--config.train.num_steps=True", r"--config.train.num_steps=True: expected an integer"),
    ("--config.optim.learning_rate=fast", r"--config.optim.learning_rate=fast: expected a number"),
    ("--config.model.channel_mult=3", r"--config.model.channel_mult=3: expected a list"),
    ("--config.model.channel_mult=[1.5]", r"elements must be int"),
    ("--config.model.bfloat16=maybe", r"--config.model.bfloat16=maybe: expected true or false"),
    ("--config.train=3", r"--config.train=3: config.train is a section"),
    ("--config.train.num_step=3", r"--config.train.num_step: train has no key 'num_step'; did you mean "
                                  r"'train.num_steps'\?"),
    ("--config.trian.num_steps=3", r"--config.trian.num_steps: the config has no key 'trian'; did you mean "
                                   r"'train'"),
    ("--config.train.num_steps", r"--config.train.num_steps: no value"),
    ("--steps=3", r"unrecognised argument '--steps=3'"),
    ("--config.train.checkpoint_every=0", r"config.train.checkpoint_every must be a positive integer, got 0"),
    ("--config.train.log_every=-5", r"config.train.log_every must be a positive integer"),
    ("--config.data.batch_size=0", r"config.data.batch_size must be a positive integer"),
    ("--config.train.sharding=zero", r"config.train.sharding must be one of \('replicate', 'fsdp'\)"),
    ("--config.train.target=y", r"config.train.target must be one of"),
    ("--config.train.ema_decay=1.5", r"config.train.ema_decay must be in \[0, 1\)"),
    ("--config.sample.solver=dpmpp_9m", r"config.sample.solver must be a registered solver"),
    ("--config.sample.spacing=cubic", r"config.sample.spacing must be one of"),
    ("--config.sample.guidance_scale=-1", r"config.sample.guidance_scale must be a non-negative number"),
    ("--config.schedule.name=quadratic", r"config.schedule.name must be one of"),
    ("--config.model.kind=resnet", r"config.model.kind must be one of"),
])
def test_bad_overrides_name_the_flag(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits.py", [override])


def test_a_config_copied_elsewhere_finds_its_common_py(tmp_path):
    """Configs import the shared defaults relatively (``from . import common``): a copied folder works, and
    nothing is added to sys.path."""
    import sys

    for name in ("common.py", "digits.py"):
        shutil.copy(os.path.join(configs_dir(), name), tmp_path / name)
    with open(tmp_path / "common.py", "a") as f:
        f.write("\n_base = base\n\n\ndef base():\n    c = _base()\n    c.seed = 7\n    return c\n")
    before = list(sys.path)
    assert load_config(str(tmp_path / "digits.py")).seed == 7  # the copy's common.py, not the shipped one
    assert load_config("digits.py").seed == 0
    assert sys.path == before
