"""Distilling step-by-step (dpmjax.methods.step_by_step): the widened student, its head, the rationale targets,
the student's sampler and the output workdir."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config

# a small program: 16 pairs from a 4-NFE teacher run, K = 2 rationale states (trajectory entries 0 and 1)
SMALL = {"method.num_pairs": 16, "method.teacher_nfe": 4, "method.rationale_states": 2, "method.generate_batch": 8}


def _config(arg="runlocal", **overrides):
    config = load_config(os.path.join(configs_dir(), "methods", "step_by_step.py") + ":" + arg)
    with config.unlocked():
        for dotted, value in overrides.items():
            section, field = dotted.split(".")
            config[section][field] = value
    return config


@pytest.fixture(scope="module")
def small(digits_teacher):
    """(teacher, config, program, state): the SMALL program, initialised once (the teacher makes the pairs)."""
    from dpmjax.methods import step_by_step

    _, teacher = digits_teacher
    config = _config(**SMALL)
    step_by_step.validate(config, teacher)
    program = step_by_step.build(config, teacher)
    state = jax.jit(program.init)(program.frozen, jax.random.key(0))
    return teacher, config, program, state


def _inputs(teacher, batch=4, seed=3):
    x = jax.random.normal(jax.random.key(seed), (batch,) + teacher.image_shape)
    t = jax.random.uniform(jax.random.key(seed + 1), (batch,), minval=0.05, maxval=1.0)
    return x, t


def _student_apply(teacher, num_states):
    from dpmjax.nn import build_model, make_apply_fn

    model = build_model(dict(teacher.config.model.to_dict(), out_channels=teacher.image_shape[-1] * (1 + num_states)))
    return make_apply_fn(model, teacher.schedule)


def _with_random_head(params, seed=7):
    """A copy of widened params whose conv_out (all channels) is random: the head is no longer zero."""
    conv = params["params"]["conv_out"]
    k1, k2 = jax.random.split(jax.random.key(seed))
    conv = dict(conv, kernel=0.1 * jax.random.normal(k1, conv["kernel"].shape),
                bias=0.1 * jax.random.normal(k2, conv["bias"].shape))
    return dict(params, params=dict(params["params"], conv_out=conv))


# ------------------------------------------------------------------------------------------------ the network

def test_widened_student_equals_the_teacher_on_the_first_channels_at_init(small):
    teacher, _, _, state = small
    x, t = _inputs(teacher)
    wide = _student_apply(teacher, 2)(state.params, x, t)
    assert wide.shape == x.shape[:-1] + (3,)
    np.testing.assert_allclose(np.asarray(wide[..., :1]), np.asarray(teacher.apply_fn()(teacher.params, x, t)),
                               rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(wide[..., 1:]))) == 0.0  # the zero head


def test_sliced_student_computes_exactly_the_first_channels_of_the_widened_one(small):
    """program.student drops the head: the teacher-shaped network reproduces channels [:C] of the widened one,
    whatever the head holds."""
    teacher, _, program, state = small
    params = _with_random_head(state.params)
    x, t = _inputs(teacher, seed=11)
    wide = _student_apply(teacher, 2)(params, x, t)
    sliced = program.student(state.replace(params=params), False)
    assert jax.tree.map(jnp.shape, sliced) == jax.tree.map(jnp.shape, teacher.params)
    np.testing.assert_allclose(np.asarray(teacher.apply_fn()(sliced, x, t)), np.asarray(wide[..., :1]),
                               rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(wide[..., 1:]))) > 0


# ------------------------------------------------------------------------------------------------ the data

def test_rationale_indices_are_the_documented_entries():
    from dpmjax.methods.step_by_step import rationale_indices

    assert rationale_indices(10, 3).tolist() == [1, 4, 6]   # the config's default (configs/methods/step_by_step.py)
    assert rationale_indices(4, 2).tolist() == [0, 1]       # SMALL
    assert rationale_indices(10, 9).tolist() == list(range(9))
    assert rationale_indices(10, 0).tolist() == []


def test_rationale_targets_are_the_teachers_trajectory_states(small):
    """targets[:, 0] is the teacher's x_0 and targets[:, 1 + k] its trajectory entry j_k, recomputed here by an
    independent call of the sampler; the pairs' noise is normal(fold_in(key(pair_seed), i)) (nested pools)."""
    from dpmjax.methods.step_by_step import pair_noise
    from dpmjax.samplers.driver import sample

    teacher, _, _, state = small
    assert state.noise.shape == (16,) + teacher.image_shape and state.targets.shape == (16, 3) + teacher.image_shape
    expected_noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), 5), teacher.image_shape)
    np.testing.assert_array_equal(np.asarray(state.noise[5]), np.asarray(expected_noise))
    np.testing.assert_array_equal(np.asarray(pair_noise(0, 4, teacher.image_shape)), np.asarray(state.noise[:4]))
    apply_fn = teacher.apply_fn()
    x0, trajectory = sample(lambda x, t: apply_fn(teacher.params, x, t), state.noise[10:16], schedule=teacher.schedule,
                            solver="dpmpp_2m", nfe=4, spacing="karras", prediction=teacher.prediction,
                            return_trajectory=True)
    assert trajectory.shape[0] == 4
    got = np.asarray(state.targets[10:16])
    np.testing.assert_allclose(got[:, 0], np.asarray(x0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[:, 1], np.asarray(trajectory[0]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[:, 2], np.asarray(trajectory[1]), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[:, 1], got[:, 2])  # distinct states


def test_denoised_rationale_is_the_teachers_x0_prediction_at_those_states(small):
    """rationale="denoised": target k is x0_teacher(x_{t_{j_k + 1}}, t_{j_k + 1}), the teacher's x0-prediction at
    the state the default rationale stores (targets[:, 1 + k], checked above) and at that state's grid time."""
    from dpmjax.methods import step_by_step
    from dpmjax.parameterization import to_x0

    teacher, config, _, state = small
    times = step_by_step.teacher_timesteps(config, teacher)
    indices = step_by_step.rationale_indices(4, 2)
    apply_fn = teacher.apply_fn()
    denoised = jax.jit(lambda params, x: step_by_step.generate_pairs(
        apply_fn, params, x, schedule=teacher.schedule, prediction=teacher.prediction, solver="dpmpp_2m",
        timesteps=times, indices=indices, batch_size=4, denoised=True))(teacher.params, state.noise[:4])
    np.testing.assert_allclose(np.asarray(denoised[:, 0]), np.asarray(state.targets[:4, 0]), rtol=1e-4, atol=1e-5)
    for k, j in enumerate(indices):
        x_state, t = state.targets[:4, 1 + k], jnp.float32(times[j + 1])
        expected = to_x0(apply_fn(teacher.params, x_state, jnp.full((4,), t)), x_state, t, teacher.schedule,
                         teacher.prediction)
        np.testing.assert_allclose(np.asarray(denoised[:, 1 + k]), np.asarray(expected), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ the loss

def test_alpha_one_gives_zero_gradient_to_the_head(small):
    from dpmjax.methods.step_by_step import distillation_loss, student_timesteps

    teacher, config, _, state = small
    apply_fn = _student_apply(teacher, 2)
    times = student_timesteps(config, teacher).astype(np.float32)

    @jax.jit  # alpha is an argument: one compile serves both weights
    def conv_out_grad(params, alpha):
        grads = jax.grad(lambda p: distillation_loss(
            apply_fn, p, state.noise[:4], state.targets[:4], times, jax.random.key(0), schedule=teacher.schedule,
            prediction=teacher.prediction, channels=1, alpha=alpha)[0])(params)
        return grads["params"]["conv_out"]

    def head_grad(alpha):
        conv = conv_out_grad(state.params, jnp.float32(alpha))
        return np.asarray(conv["kernel"]), np.asarray(conv["bias"])

    kernel, bias = head_grad(1.0)
    assert np.all(kernel[..., 1:] == 0) and np.all(bias[1:] == 0)
    assert np.any(kernel[..., :1] != 0)
    kernel, bias = head_grad(0.5)
    assert np.abs(kernel[..., 1:]).max() > 0 and np.abs(bias[1:]).max() > 0


@pytest.mark.parametrize("steps", [1, 2])
def test_training_rollout_is_the_registered_sampler(small, steps):
    """student_rollout (training) == dpmjax.sample with the solver, NFE and spacing the output workdir's sample
    section names (renoise: x0-prediction at t_0 = 1 for k = 1; fresh noise fold_in(key, i) for k = 2)."""
    from dpmjax.methods import step_by_step
    from dpmjax.samplers.driver import sample

    teacher, _, program, state = small
    config = _config(**SMALL, **{"method.student_steps": steps})
    out = step_by_step.build(config, teacher).output["sample"]
    assert out == {"solver": "renoise", "nfe": steps, "spacing": "time_uniform"}
    times = step_by_step.student_timesteps(config, teacher).astype(np.float32)
    assert times[0] == 1.0 and len(times) == steps + 1
    params = _with_random_head(state.params)
    x_T, key = state.noise[:4], jax.random.key(5)
    by_hand, _ = step_by_step.student_rollout(_student_apply(teacher, 2), params, x_T, times, key,
                                              schedule=teacher.schedule, prediction=teacher.prediction, channels=1)
    apply_fn, sliced = teacher.apply_fn(), program.student(state.replace(params=params), False)
    sampled = sample(lambda x, t: apply_fn(sliced, x, t), x_T, schedule=teacher.schedule, solver=out["solver"],
                     nfe=out["nfe"], spacing=out["spacing"], prediction=teacher.prediction, key=key)
    np.testing.assert_allclose(np.asarray(by_hand), np.asarray(sampled), rtol=1e-4, atol=1e-5)


def test_ablation_has_no_head_and_the_same_pairs(digits_teacher):
    """aux=False: a teacher-shaped student, targets x_0 only (shapes from jax.eval_shape: nothing compiles)."""
    from dpmjax.methods import step_by_step

    _, teacher = digits_teacher
    program = step_by_step.build(_config("runlocal,aux=false", **SMALL), teacher)
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    assert state.targets.shape == (16, 1) + teacher.image_shape
    assert state.params["params"]["conv_out"]["kernel"].shape == teacher.params["params"]["conv_out"]["kernel"].shape


# ------------------------------------------------------------------------------------------------ the method

def test_finetune_then_sample_the_output_workdir(digits_teacher, small, tmp_path):
    """finetune 3 updates; the output workdir has the teacher's model config and a renoise/1-NFE sample section;
    its loaded params are program.student of the final state; `dpmjax sample` writes the one-step x0-predictions
    x0(x_T, t = 1) computed by hand from the CLI's noise."""
    from dpmjax.main import main
    from dpmjax.methods import finetune
    from dpmjax.parameterization import to_x0
    from dpmjax.workdir import load_params

    teacher_dir, teacher = digits_teacher
    _, _, program, _ = small
    out = str(tmp_path / "sbs")
    config = _config(**SMALL, **{"train.num_steps": 3})
    final = finetune("step_by_step", teacher, config, out, num_devices=1, quiet=True)
    assert int(final.step) == 3
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["sample"]["solver"] == "renoise" and written["sample"]["nfe"] == 1
    assert written["model"] == json.loads(teacher.config.model.to_json())
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows and all(np.isfinite(r["rationale_mse"]) and r["rationale_mse"] > 0 for r in rows)
    _, params, _, _ = load_params(out)
    expected = program.student(final.method, True)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(teacher.params))) > 0

    samples = str(tmp_path / "s.npz")
    assert main(["sample", "--workdir", out, "--num", "8", "--out", samples]) == 0
    images = np.load(samples)["images"]
    noise_key, _ = jax.random.split(jax.random.key(0))  # cmd_sample_workdir's noise, seed 0, one chunk of 8
    x_T = jax.random.normal(jax.random.fold_in(noise_key, 0), (8,) + teacher.image_shape, jnp.float32)
    t = jnp.ones((8,), jnp.float32)
    by_hand = to_x0(teacher.apply_fn()(params, x_T, t), x_T, jnp.float32(1.0), teacher.schedule, teacher.prediction)
    np.testing.assert_allclose(images, np.clip(np.asarray(by_hand), -1, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ({"method.num_pairs": 0}, "num_pairs"),
    ({"method.teacher_solver": "ddpm"}, "deterministic"),
    ({"method.teacher_solver": "nope"}, "registered solver"),
    ({"method.rationale_states": 4}, "below teacher_nfe"),
    ({"method.alpha": 0.0}, "alpha"),
    ({"method.alpha": 1.5}, "alpha"),
    ({"method.student_steps": 0}, "student_steps"),
    ({"method.spacing": "nope"}, "spacing"),
    ({"method.colour": 1}, "unknown"),
    ({"method.rationale": "text"}, "rationale"),
    ({"data.batch_size": 0}, "batch_size"),
])
def test_bad_settings_fail_before_compiling(digits_teacher, tmp_path, override, message):
    from dpmjax.methods import finetune

    _, teacher = digits_teacher
    config = _config(**SMALL)
    with config.unlocked():
        for dotted, value in override.items():
            section, field = dotted.split(".")
            config[section][field] = value
    with pytest.raises(ValueError, match=message):
        finetune("step_by_step", teacher, config, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_a_converted_diffusers_teacher_is_widened_and_sliced_back():
    """The diffusers port (``dpmjax convert`` teachers) has the same ``conv_out``: the method validates and its
    init traces on it (shapes only), the widened port equals the teacher on the first C channels with a zero head,
    and program.student returns teacher-shaped params that compute exactly those channels whatever the head holds."""
    from dpmjax.methods import step_by_step
    from tiny_configs import diffusers_teacher

    teacher = diffusers_teacher()
    config = _config(**SMALL)
    step_by_step.validate(config, teacher)
    program = step_by_step.build(config, teacher)
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    widened = step_by_step.widen_output(teacher.params, 2)
    assert jax.tree.map(jnp.shape, widened) == jax.tree.map(lambda s: s.shape, state.params)
    x, t = _inputs(teacher)
    wide_apply, narrow_apply = jax.jit(_student_apply(teacher, 2)), jax.jit(teacher.apply_fn())
    wide = wide_apply(widened, x, t)
    np.testing.assert_allclose(np.asarray(wide[..., :1]), np.asarray(narrow_apply(teacher.params, x, t)),
                               rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(wide[..., 1:]))) == 0.0
    params = _with_random_head(widened)
    sliced = program.student(state.replace(params=params), False)
    assert jax.tree.map(jnp.shape, sliced) == jax.tree.map(jnp.shape, teacher.params)
    np.testing.assert_allclose(np.asarray(narrow_apply(sliced, x, t)), np.asarray(wide_apply(params, x, t)[..., :1]),
                               rtol=1e-5, atol=1e-6)


def test_a_dit_teacher_is_refused_by_name():
    """A DiT has no conv_out to widen: refused before anything is built, naming the kinds that work."""
    import ml_collections

    from dpmjax.methods import Teacher, step_by_step
    from dpmjax.nn import build_model
    from dpmjax.schedules import schedule_from_config
    from tiny_configs import teacher_config

    config = teacher_config()
    with config.unlocked():
        config.model = ml_collections.ConfigDict(dict(kind="dit", patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                                      freq_dim=32, bfloat16=False))
    teacher = Teacher(build_model(config.model), None, schedule_from_config(config.schedule), config)
    with pytest.raises(ValueError, match="diffusers_unet.*'dit'"):
        step_by_step.validate(_config(**SMALL), teacher)
