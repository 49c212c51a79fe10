"""DMD2 (dpmjax/methods/dmd2.py): the distribution-matching gradient, the GAN losses, TTUR, backward simulation,
the "renoise" sampler it is sampled with, and the run end to end (API and CLI) on the tiny digits teacher."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.config import configs_dir, load_config
from dpmjax.methods import dmd2
from dpmjax.schedules import DiscreteVP

SCHEDULE = DiscreteVP.from_name("linear")
CONFIG = os.path.join(configs_dir(), "methods", "dmd2.py")


def dmd2_config(variant="", **overrides):
    """configs/methods/dmd2.py:VARIANT with ``section.field=value`` overrides (as the CLI gives them)."""
    return load_config(f"{CONFIG}:{variant}" if variant else CONFIG,
                       [f"--config.{name.replace('__', '.')}={value}" for name, value in overrides.items()])


# ------------------------------------------------------------------------------------------- pure pieces

def test_dm_gradient_is_fake_minus_real_over_the_normaliser(rng):
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 1)), jnp.float32)
    x0_real = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    x0_fake = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    grad_x = jax.grad(lambda x: dmd2.distribution_matching_loss(x, x0_real, x0_fake)[0])(x)
    # by hand: dL/dx = (x0_fake - x0_real) / mean|x - x0_real| (per sample) / numel
    normaliser = np.mean(np.abs(np.asarray(x - x0_real)), axis=(1, 2, 3), keepdims=True)
    want = (np.asarray(x0_fake) - np.asarray(x0_real)) / normaliser / x.size
    np.testing.assert_allclose(np.asarray(grad_x), want, rtol=1e-5, atol=1e-9)
    # the denoisers get no gradient: the loss moves x only (towards the real score's prediction)
    grads = jax.grad(lambda r, f: dmd2.distribution_matching_loss(x, r, f)[0], argnums=(0, 1))(x0_real, x0_fake)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in grads)
    # real == fake: exactly zero gradient
    same = jax.grad(lambda x: dmd2.distribution_matching_loss(x, x0_real, x0_real)[0])(x)
    assert float(jnp.max(jnp.abs(same))) == 0.0


def test_gan_losses_have_the_non_saturating_signs():
    confident = dmd2.discriminator_loss(jnp.full((4,), 5.0), jnp.full((4,), -5.0))
    fooled = dmd2.discriminator_loss(jnp.full((4,), -5.0), jnp.full((4,), 5.0))
    assert float(confident) < 0.02 < 10.0 < float(fooled)
    # the generator's loss falls as D calls its samples real, and is softplus(-logit)
    assert float(dmd2.generator_gan_loss(jnp.full((4,), 5.0))) < float(dmd2.generator_gan_loss(jnp.zeros(4)))
    np.testing.assert_allclose(float(dmd2.generator_gan_loss(jnp.zeros(4))), np.log(2.0), rtol=1e-6)
    # discriminator gradient: pushes real logits up, fake logits down
    g_real, g_fake = jax.grad(dmd2.discriminator_loss, argnums=(0, 1))(jnp.zeros(4), jnp.zeros(4))
    assert np.all(np.asarray(g_real) < 0) and np.all(np.asarray(g_fake) > 0)


def toy_x0(params, x, t):
    """A cheap generator with a time dependence: x0 = w * x * (1 + t)."""
    return params["w"] * x * (1.0 + t[:, None])


def test_backward_simulation_and_renoise_sampler_match_a_hand_loop():
    params = {"w": jnp.asarray(0.7, jnp.float32)}
    grid = dmd2.generator_grid(SCHEDULE, 4, "trailing")
    # trailing on the 1000-step schedule: the official DMD2 timesteps 999, 749, 499, 249 (t = (n + 1)/N), then the end
    np.testing.assert_allclose(grid, [1.0, 0.75, 0.5, 0.25, 0.001])
    times = jnp.asarray(grid, jnp.float32)
    noise = jax.random.normal(jax.random.key(0), (5, 2), jnp.float32)
    key = jax.random.key(1)
    alpha, sigma = np.asarray(SCHEDULE.alpha(times)), np.asarray(SCHEDULE.sigma(times))

    def hand(num_run):
        x = np.asarray(noise)
        x0 = None
        for i in range(num_run + 1):
            x0 = np.asarray(toy_x0(params, jnp.asarray(x), jnp.full((5,), times[i])))
            if i < num_run:
                z = np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32))
                x = alpha[i + 1] * x0 + sigma[i + 1] * z
        return x, x0

    for num_run in range(4):
        got = dmd2.backward_simulation(toy_x0, params, noise, key, jnp.asarray(num_run), times, SCHEDULE)
        np.testing.assert_allclose(np.asarray(got), hand(num_run)[0], rtol=1e-5, atol=1e-6)
    # the sampler the output workdir names: same grid, same draws, output = the last x0-prediction
    sampled = dpmjax.sample(lambda x, t: toy_x0(params, x, t), noise, schedule=SCHEDULE, solver="renoise", nfe=4,
                            spacing="trailing", prediction="x0", key=key)
    np.testing.assert_allclose(np.asarray(sampled), hand(3)[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="stochastic: pass key"):
        dpmjax.sample(lambda x, t: x, noise, schedule=SCHEDULE, solver="renoise", nfe=4, prediction="x0")


def test_dm_and_gan_times_fall_in_the_configured_range():
    t = dmd2.sample_time_range(jax.random.key(0), 4096, SCHEDULE, 0.02, 0.98)
    n = np.round(np.asarray(t) * 1000 - 1)
    assert n.min() == 20 and n.max() == 980  # the official randint(min_step, max_step + 1)
    np.testing.assert_allclose(np.asarray(t), (n + 1) / 1000, atol=1e-6)


# ------------------------------------------------------------------------------------------- the program

def test_ttur_updates_the_generator_every_ttur_steps_and_the_critic_every_step(digits_teacher):
    """ttur=3, no GAN, no weight decay: update 0 is a generator update whose DM gradient is exactly zero (fake
    score == teacher at init); updates 1, 2, 4 leave the generator alone; update 3 moves it; the fake score moves
    at every update."""
    _, teacher = digits_teacher
    config = dmd2_config("gan=false,ttur=3", data__batch_size=4, optim__weight_decay=0.0, train__ema_decay=0.0)
    program = dmd2.build(config, teacher)
    assert not program.needs_data and program.output["sample"] == {"solver": "renoise", "nfe": 1,
                                                                     "spacing": "trailing"}
    state = jax.jit(program.init)(program.frozen, jax.random.key(0))
    update = jax.jit(program.update)

    def leaves(tree):
        return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]

    def changed(a, b):
        return any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))

    for step in range(5):
        new, scalars = update(state, None, program.frozen, jax.random.key(10 + step))
        is_gen = step % 3 == 0
        assert float(scalars["generator_updated"]) == float(is_gen)
        assert changed(state.critic, new.critic), step
        if step == 0:
            assert float(scalars["generator_grad_norm"]) == 0.0  # real == fake score: no DM gradient
            assert not changed(state.generator, new.generator)
        else:
            assert changed(state.generator, new.generator) == is_gen, step
            assert changed(state.generator_ema, new.generator_ema) == is_gen, step  # ema_decay 0: EMA = params
        state = new
    assert int(state.step) == 5
    assert update._cache_size() == 1  # the teacher is an argument: one program for every update


def test_bad_settings_raise_before_compiling(digits_teacher, tmp_path):
    _, teacher = digits_teacher
    bad = [({"method__ttur": 0}, "ttur"), ({"method__num_steps_gen": 0}, "num_steps_gen"),
           ({"method__min_step_percent": 0.9, "method__max_step_percent": 0.5}, "min_step_percent"),
           ({"method__gan_weight": -1.0}, "gan_weight"), ({"method__spacing": "cubic"}, "spacing"),
           ({"method__num_steps_gen": 2000}, "num_steps_gen"), ({"method__max_step_percent": 1.5}, "max_step")]
    for overrides, match in bad:
        with pytest.raises(ValueError, match=match):
            dpmjax.methods.finetune("dmd2", teacher, dmd2_config(**overrides), str(tmp_path / "out"), num_devices=1)
    config = dmd2_config()
    with config.unlocked():
        config.method.temperature = 1.0
    with pytest.raises(ValueError, match="unknown setting"):
        dpmjax.methods.finetune("dmd2", teacher, config, str(tmp_path / "out"), num_devices=1)
    with pytest.raises(ValueError, match="variant"):
        dmd2_config("steps")
    assert not os.path.exists(tmp_path / "out" / "checkpoints") or not os.listdir(tmp_path / "out" / "checkpoints")


def test_finetune_cli_then_sample_runs_the_generator_on_its_training_grid(digits_teacher, tmp_path):
    """2-step generator with the GAN on real digits, 1 update through ``dpmjax finetune``; the workdir loads with
    ``load_params``, its sample section names the renoise sampler, and that sampler gives exactly the generator run
    by hand on the training grid; ``dpmjax sample`` on it works."""
    from dpmjax.main import main
    from dpmjax.nn import make_apply_fn
    from dpmjax.workdir import load_params, sample_settings

    teacher_dir, teacher = digits_teacher
    out = str(tmp_path / "dmd2")
    assert main(["finetune", "--method", "dmd2", "--teacher", teacher_dir, "--workdir", out, "--num-devices", "1",
                 "--config", f"{CONFIG}:steps=2,runlocal", "--config.train.num_steps=1",
                 "--config.train.checkpoint_every=1"]) == 0  # one update: one compile (update 0 moves G)
    model, params, schedule, config = load_params(out)
    settings = sample_settings(config)
    assert (settings["solver"], settings["nfe"], settings["spacing"]) == ("renoise", 2, "trailing")
    assert config.train.target == teacher.prediction
    teacher_leaves = jax.tree.leaves(teacher.params)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params), teacher_leaves))  # it trained
    apply_fn = make_apply_fn(model, schedule)
    sampler = dpmjax.make_param_sampler(apply_fn, schedule=schedule, solver=settings["solver"], nfe=settings["nfe"],
                                        spacing=settings["spacing"], prediction=config.train.target)
    x_T = jax.random.normal(jax.random.key(0), (4, 8, 8, 1), jnp.float32)
    key = jax.random.key(1)
    sampled = np.asarray(sampler(params, x_T, key))
    times = jnp.asarray(dmd2.generator_grid(schedule, 2, "trailing"), jnp.float32)

    def x0_fn(p, x, t):
        return dpmjax.parameterization.to_x0(apply_fn(p, x, t), x, t, schedule, config.train.target)

    x_last = dmd2.backward_simulation(x0_fn, params, x_T, key, jnp.asarray(1), times, schedule)
    by_hand = x0_fn(params, x_last, jnp.full((4,), times[1]))
    np.testing.assert_allclose(sampled, np.asarray(by_hand), rtol=1e-4, atol=1e-5)
    assert main(["sample", "--workdir", out, "--num", "8", "--batch-size", "8"]) == 0
    assert os.path.exists(os.path.join(out, "samples_renoise_nfe2.npz"))


def test_unet_bottleneck_option_changes_nothing_else(digits_teacher):
    """``return_bottleneck=True`` (the GAN head's input) returns the same output plus the middle block's features."""
    _, teacher = digits_teacher
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1), jnp.float32)
    t = jnp.asarray([10.0, 500.0])
    apply = jax.jit(teacher.model.apply, static_argnames="return_bottleneck")
    plain = apply(teacher.params, x, t)
    out, bottleneck = apply(teacher.params, x, t, return_bottleneck=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    assert bottleneck.shape == (2, 8, 8, 16)  # the tiny teacher: one level of 16 channels, no downsampling


def test_a_converted_diffusers_teacher_takes_the_gan_head_on_its_mid_block():
    """The diffusers port (``dpmjax convert`` teachers, e.g. google/ddpm-cifar10-32) returns its mid block's output
    with ``return_bottleneck=True`` and the same output as without; DMD2 with the GAN validates, builds and traces
    its update on such a teacher (shapes only: compiling the port's update costs minutes on 2 cores; the GAN's
    numerics are the UNet tests')."""
    from tiny_configs import diffusers_teacher

    teacher = diffusers_teacher()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1), jnp.float32)
    t = jnp.asarray([10.0, 500.0])
    apply = jax.jit(teacher.model.apply, static_argnames="return_bottleneck")
    out, bottleneck = apply(teacher.params, x, t, return_bottleneck=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(apply(teacher.params, x, t)))
    assert bottleneck.shape == (2, 4, 4, 32)  # 8x8 -> 4x4, the last level's 32 channels

    config = dmd2_config("gan=true,ttur=2", data__batch_size=4)
    dmd2.validate(config, teacher)
    program = dmd2.build(config, teacher)
    assert program.needs_data
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    assert state.critic["head"]["params"]["conv"]["kernel"].shape[2] == 32  # the head reads the 32-channel mid block
    batch = {"image": jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32), "label": jax.ShapeDtypeStruct((4,), jnp.int32)}
    new, scalars = jax.eval_shape(program.update, state, batch, program.frozen, jax.random.key(1))
    assert jax.tree.map(lambda s: s.shape, new) == jax.tree.map(lambda s: s.shape, state)
    assert scalars["loss_gan_d"].shape == () and scalars["loss_gan_g"].shape == ()


@pytest.mark.parametrize("method, variant", [("dmd2", ""), ("dmd2", "steps=4"), ("step_by_step", "pairs=512")])
def test_paper_scale_configs_take_the_converted_ddpm_cifar10_teacher(method, variant):
    """configs/methods/{dmd2,step_by_step}_cifar10.py validate and build (shapes only: no weights, nothing run) on
    a teacher with google/ddpm-cifar10-32's layout as ``dpmjax convert`` writes it: DMD2 with its GAN head on
    the port's mid block, step-by-step with the port's conv_out widened."""
    from tiny_configs import ddpm_cifar10_teacher

    from dpmjax.methods import get_method

    teacher = ddpm_cifar10_teacher()
    path = os.path.join(configs_dir(), "methods", f"{method}_cifar10.py")
    config = load_config(f"{path}:{variant}" if variant else path)
    get_method(method).validate(config, teacher)
    program = get_method(method).build(config, teacher)
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    if method == "dmd2":
        assert config.method.gan and "head" in state.critic
    else:
        assert state.params["params"]["conv_out"]["kernel"].shape[-1] == 3 * (1 + config.method.rationale_states)
