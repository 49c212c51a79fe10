"""Reward finetuning on the online loop (dpmjax/methods/online_rl.py, prdp.py, ddpo.py): the epoch's sampling,
buffer and reference log-probabilities, the CLI run and its output workdir, a reward failing mid-run, bad settings."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.metrics import rewards
from dpmjax.samplers import policy


def method_config(name, variant="runlocal,reward=jpeg_incompressibility", **overrides):
    config = load_config(os.path.join(configs_dir(), "methods", f"{name}.py") + ":" + variant)
    with config.unlocked():
        for dotted, value in overrides.items():
            section, field = dotted.split("__")
            config[section][field] = value
    return config


def test_an_epoch_samples_with_the_snapshot_scores_with_the_reward_and_keeps_its_buffer(digits_teacher):
    """K = 2: update 0 samples G x n trajectories with the current params (= the teacher: old == ref), rewards them
    with the host reward (the JPEG size of the final images, clipped to [-1, 1]); update 1 reuses that buffer;
    update 2 resamples from the params after update 1, whose recorded log-probabilities are the recomputed ones."""
    from dpmjax.methods import prdp

    _, teacher = digits_teacher
    config = method_config("prdp", method__updates_per_epoch=2)
    prdp.METHOD.validate(config, teacher)
    program = prdp.METHOD.build(config, teacher)
    assert not program.needs_data and program.output["sample"]["solver"] == "ddpm"
    state = jax.jit(program.init)(program.frozen, jax.random.key(0))
    update = jax.jit(program.update)
    s1, scalars = update(state, None, program.frozen, jax.random.key(1))
    assert s1.states.shape == (4, 4, 8, 8, 1) and s1.rewards.shape == (2, 2)  # T + 1 = 4 states, G n = 4
    final = np.clip(np.asarray(s1.states[-1]), -1, 1)
    expected = rewards.jpeg_incompressibility()(jnp.asarray(final), jnp.zeros((4,), jnp.int32))
    np.testing.assert_allclose(np.asarray(s1.rewards).reshape(-1), np.asarray(expected), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s1.log_probs_old), np.asarray(s1.log_probs_ref), rtol=1e-5, atol=1e-3)
    assert float(scalars["reward_mean"]) == pytest.approx(float(np.mean(expected)), rel=1e-6)
    s2, _ = update(s1, None, program.frozen, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(s2.states), np.asarray(s1.states))  # same epoch: same trajectories
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)))
    s3, _ = update(s2, None, program.frozen, jax.random.key(3))
    assert not np.allclose(np.asarray(s3.states), np.asarray(s2.states))  # a new epoch
    for a, b in zip(jax.tree.leaves(s3.old_params), jax.tree.leaves(s2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    times = jnp.asarray(program_times(config, teacher))
    recomputed = policy.trajectory_log_probs(teacher.apply_fn(), s3.old_params, s3.states, times,
                                             schedule=teacher.schedule, prediction=teacher.prediction)
    np.testing.assert_allclose(np.asarray(s3.log_probs_old), np.asarray(recomputed).T.reshape(2, 2, 3),
                               rtol=1e-5, atol=1e-3)
    assert update._cache_size() == 1


def program_times(config, teacher):
    from dpmjax.methods.online_rl import policy_timesteps

    return policy_timesteps(config, teacher)


def test_finetune_cli_then_sample_the_output(digits_teacher, tmp_path):
    """``dpmjax finetune --method prdp`` (DDPO runs through the same loop: the failing-reward test below) writes a
    workdir that loads with the policy's sampler, has moved from the teacher and samples with ``dpmjax sample``."""
    from dpmjax.main import main
    from dpmjax.workdir import load_params, sample_settings

    teacher_dir, teacher = digits_teacher
    out = str(tmp_path / "prdp")
    config = os.path.join(configs_dir(), "methods", "prdp.py") + ":runlocal,reward=jpeg_incompressibility"
    assert main(["finetune", "--method", "prdp", "--teacher", teacher_dir, "--workdir", out, "--num-devices", "1",
                 "--config", config]) == 0
    _, params, _, config = load_params(out)
    assert sample_settings(config)["solver"] == "ddpm" and sample_settings(config)["nfe"] == 3
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(teacher.params)))
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 2 and all('"reward_mean"' in line for line in lines)
    assert main(["sample", "--workdir", out, "--num", "4", "--batch-size", "4"]) == 0


def test_a_reward_failing_mid_run_stops_with_the_steps_and_keeps_the_checkpoint(digits_teacher, tmp_path,
                                                                                  monkeypatch):
    """A host reward that raises on its third epoch: the run stops naming the step range and the reward's
    message; the checkpoint of step 2 (after epoch 1, K = 1) is there and restorable."""
    import dpmjax.methods
    from dpmjax.methods import online_rl
    from dpmjax.train.loop import StepFailedError
    from dpmjax.workdir import checkpoint_steps

    calls = {"n": 0}

    def flaky(images, labels):
        calls["n"] += 1
        if calls["n"] > 3:  # the probe batch of validate, then epochs 1 and 2
            raise OSError("reward server unreachable")
        return np.zeros(len(images))

    flaky_reward = rewards.host_reward("flaky", flaky)
    monkeypatch.setattr(online_rl, "reward_from_spec", lambda spec, image_shape=None: flaky_reward)
    _, teacher = digits_teacher
    config = method_config("ddpo", "runlocal,objective=reinforce", train__checkpoint_every=2, train__log_every=1)
    out = str(tmp_path / "flaky")
    with pytest.raises(StepFailedError, match="step 3.*reward server unreachable.*checkpoint is step 2"):
        dpmjax.methods.finetune("ddpo", teacher, config, out, num_devices=1, quiet=True)
    assert checkpoint_steps(out)[-1] == 2


@pytest.mark.parametrize("method, override, message", [
    ("prdp", {"method__group_size": 1}, "group_size"),
    ("prdp", {"method__beta": 0.0}, "beta"),
    ("prdp", {"method__eta": 0.0}, "eta"),
    ("prdp", {"method__spacing": "cubic"}, "spacing"),
    ("prdp", {"method__reward": "aesthetic"}, "unknown reward"),
    ("prdp", {"method__reward": "classifier:digits:label"}, "unconditional"),
    ("prdp", {"method__reward": "2x*jpeg_compressibility"}, "weight"),
    ("prdp", {"method__temperature": 1.0}, "unknown prdp settings"),
    ("ddpo", {"method__objective": "trpo"}, "objective"),
    ("ddpo", {"method__clip_range": -1.0}, "clip_range"),
])
def test_bad_settings_fail_before_compiling(digits_teacher, tmp_path, method, override, message):
    import dpmjax.methods

    _, teacher = digits_teacher
    config = method_config(method)
    with config.unlocked():
        for dotted, value in override.items():
            section, field = dotted.split("__")
            config[section][field] = value
    with pytest.raises(ValueError, match=message):
        dpmjax.methods.finetune(method, teacher, config, str(tmp_path / "out"), num_devices=1)
    assert not os.path.exists(tmp_path / "out" / "checkpoints") or not os.listdir(tmp_path / "out" / "checkpoints")


def test_a_reward_returning_nan_is_refused_on_the_probe_batch(digits_teacher, tmp_path, monkeypatch):
    import dpmjax.methods
    from dpmjax.methods import online_rl

    nan_reward = rewards.host_reward("nan", lambda x, y: np.full(len(x), np.nan))
    monkeypatch.setattr(online_rl, "reward_from_spec", lambda spec, image_shape=None: nan_reward)
    _, teacher = digits_teacher
    with pytest.raises(rewards.RewardError, match="'nan' returned NaN"):
        dpmjax.methods.finetune("prdp", teacher, method_config("prdp"), str(tmp_path / "out"), num_devices=1)


def test_the_groups_draw_their_classes_from_the_first_classes(tmp_path):
    """classes=2 on a class-conditional teacher (random weights: only the epoch's labels are checked): every group
    is one class, all from {0, 1}; classes on an unconditional teacher or above the teacher's classes is refused."""
    from tiny_configs import tiny_unet_config

    from dpmjax.methods import Teacher, prdp
    from dpmjax.nn import build_model, init_params
    from dpmjax.schedules import schedule_from_config

    teacher_config = tiny_unet_config()
    with teacher_config.unlocked():
        teacher_config.model.num_classes = 10
    model = build_model(teacher_config.model)
    teacher = Teacher(model, init_params(model, (8, 8, 1), 0), schedule_from_config(teacher_config.schedule),
                      teacher_config)
    config = method_config("prdp", method__classes=2, method__groups=8)
    prdp.METHOD.validate(config, teacher)
    program = prdp.METHOD.build(config, teacher)
    state = jax.jit(program.init)(program.frozen, jax.random.key(0))
    state, _ = jax.jit(program.update)(state, None, program.frozen, jax.random.key(1))
    labels = np.asarray(state.labels).reshape(8, 2)
    assert set(np.unique(labels)) == {0, 1} and np.all(labels == labels[:, :1])
    with pytest.raises(ValueError, match="at most the teacher's 10 classes"):
        prdp.METHOD.validate(method_config("prdp", method__classes=11), teacher)


def test_classes_on_an_unconditional_teacher_is_refused(digits_teacher):
    from dpmjax.methods import prdp

    with pytest.raises(ValueError, match="unconditional"):
        prdp.METHOD.validate(method_config("prdp", method__classes=2), digits_teacher[1])


@pytest.mark.parametrize("variant, method", [("", "prdp"), ("baseline=ppo", "ddpo"), ("baseline=reinforce", "ddpo")])
def test_the_paper_scale_config_takes_the_converted_ddpm_cifar10_teacher(variant, method):
    """configs/methods/prdp_cifar10.py (PRDP, and DDPO / REINFORCE at the same budget) validates, builds and
    traces one update (shapes only) on a teacher with google/ddpm-cifar10-32's layout as ``dpmjax convert`` writes
    it: 32 groups x 16 trajectories of 50 steps."""
    from tiny_configs import ddpm_cifar10_teacher

    from dpmjax.methods import get_method

    teacher = ddpm_cifar10_teacher()
    config = load_config(os.path.join(configs_dir(), "methods", "prdp_cifar10.py") + (f":{variant}" if variant else ""))
    assert config.method.name == method
    get_method(method).validate(config, teacher)
    program = get_method(method).build(config, teacher)
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    assert state.states.shape == (51, 512, 32, 32, 3) and state.rewards.shape == (32, 16)
    new, scalars = jax.eval_shape(program.update, state, None, program.frozen, jax.random.key(1))
    assert jax.tree.map(lambda s: s.shape, new) == jax.tree.map(lambda s: s.shape, state)
    assert scalars["loss"].shape == ()
