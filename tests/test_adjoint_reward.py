"""AdjointDPM reward finetuning (dpmjax/methods/adjoint_reward.py): the output solver samples the map that was
trained through, an update's gradient is that of the reward through the sampler and ascends it, the CLI run, and
bad settings. The reward is a small randomly initialised classifier's p(3 | x) (no training needed)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.metrics import rewards
from dpmjax.metrics.domain import DomainMetric
from dpmjax.nn.classifier import Classifier


def tiny_reward():
    module = Classifier(channels=(8,), feature_dim=16, num_classes=10)
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    return rewards.classifier_reward(DomainMetric("digits", module, params, test_accuracy=0.0), 3, kind="prob")


@pytest.fixture
def patched_reward(monkeypatch):
    from dpmjax.methods import adjoint_reward

    reward = tiny_reward()
    monkeypatch.setattr(adjoint_reward, "reward_from_spec", lambda spec, image_shape=None: reward)
    return reward


def method_config(variant="runlocal", **method):
    config = load_config(os.path.join(configs_dir(), "methods", "adjoint_reward.py") + ":" + variant)
    with config.unlocked():
        config.method.update(method)
    return config


@pytest.mark.parametrize("solver, stages", [("heun", 2), ("euler", 1)])
def test_the_registered_solver_of_the_output_workdir_is_the_trained_ode_map(x64, solver, stages):
    """diffrax's fixed-grid solve in rho (what the adjoint differentiates) and the registered solver named in the
    output's sample section give the same x_0 in float64 on an exact Gaussian-mixture model, on every spacing."""
    import dpmjax
    from dpmjax import oracle
    from dpmjax.adjoint import generate
    from dpmjax.methods.adjoint_reward import _output_sampler
    from dpmjax.samplers.driver import sample

    schedule = dpmjax.LinearVP()
    mixture = oracle.GaussianMixture.random(0, num_modes=3, dim=2, scale=1.0)
    x_T = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2)))
    for spacing in ("logSNR", "time_uniform", "karras"):
        out = _output_sampler(dict(solver=solver, steps=6, adjoint="backsolve", spacing=spacing))
        assert out == {"solver": solver, "nfe": 6 * stages, "spacing": spacing}
        trained, _ = generate(lambda p, x, t: mixture.eps(x, t, schedule), {}, x_T, schedule=schedule,
                              method="backsolve", num_steps=6, solver=solver, spacing=spacing)
        sampled = sample(lambda x, t: mixture.eps(x, t, schedule), x_T, schedule=schedule, solver=out["solver"],
                         nfe=out["nfe"], spacing=spacing)
        np.testing.assert_allclose(np.asarray(trained), np.asarray(sampled), rtol=0, atol=1e-11)


def test_an_update_takes_the_rewards_gradient_through_the_sampler_and_ascends_it(digits_teacher, patched_reward):
    """adjoint="checkpoint" (the exact gradient of the discretised ODE): the update's reward and gradient norm
    equal those of jax.grad through the registered heun solver (``dpmjax.sample``, another code path) on the
    update's own noise; the step moves every parameter up its reward gradient."""
    from dpmjax.methods import adjoint_reward
    from dpmjax.samplers.driver import sample

    _, teacher = digits_teacher
    config = method_config(adjoint="checkpoint")
    adjoint_reward.METHOD.validate(config, teacher)
    program = adjoint_reward.METHOD.build(config, teacher)
    assert not program.needs_data and program.output["sample"] == {"solver": "heun", "nfe": 4, "spacing": "karras"}
    state = jax.jit(program.init)(program.frozen, jax.random.key(0))
    key = jax.random.key(1)
    new_state, scalars = jax.jit(program.update)(state, None, program.frozen, key)

    x_T = jax.random.normal(jax.random.split(key)[1], (4, 8, 8, 1), jnp.float32)  # the update's noise
    apply_fn, labels = teacher.apply_fn(), jnp.zeros((4,), jnp.int32)

    def mean_reward(params):
        x_0 = sample(lambda x, t: apply_fn(params, x, t), x_T, schedule=teacher.schedule, solver="heun", nfe=4,
                     spacing="karras", prediction=teacher.prediction)
        return jnp.mean(patched_reward.fn(patched_reward.params, jnp.clip(x_0, -1, 1), labels))

    before, grads = jax.jit(jax.value_and_grad(mean_reward))(state.params)
    grad_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
    assert float(scalars["reward_mean"]) == pytest.approx(float(before), rel=1e-4, abs=1e-6)
    assert float(scalars["loss"]) == pytest.approx(-float(before), rel=1e-4, abs=1e-6)
    # float32 rounding differs between the two programs, and x_0's background sits at the clip edge -1, where
    # it switches pixels' gradients on or off: agreement to ~1 %, not to rounding
    assert float(scalars["grad_norm"]) == pytest.approx(grad_norm, rel=3e-2)
    assert grad_norm > 0
    # Adam's first step moves each parameter by lr in the direction of its reward gradient (lr sign(g)): the
    # update ascends wherever the gradient is not negligible (a sign error would give agreement ~0)
    delta = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(new_state.params),
                                                             jax.tree.leaves(state.params))])
    g = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(grads)])
    large = np.abs(g) > 1e-3 * np.abs(g).max()
    assert large.sum() > 100 and np.mean(np.sign(delta[large]) == np.sign(g[large])) > 0.97


def test_finetune_cli_then_sample_the_output(digits_teacher, patched_reward, tmp_path):
    """``dpmjax finetune --method adjoint_reward`` (the paper's backsolve adjoint) writes a workdir that has moved
    from the teacher and that ``dpmjax sample`` runs with the trained map's solver."""
    from dpmjax.main import main
    from dpmjax.workdir import load_params, sample_settings

    teacher_dir, teacher = digits_teacher
    out = str(tmp_path / "adjoint")
    config = os.path.join(configs_dir(), "methods", "adjoint_reward.py") + ":runlocal"
    assert main(["finetune", "--method", "adjoint_reward", "--teacher", teacher_dir, "--workdir", out,
                 "--num-devices", "1", "--config", config]) == 0
    _, params, _, config = load_params(out)
    settings = sample_settings(config)
    assert (settings["solver"], settings["nfe"], settings["spacing"]) == ("heun", 4, "karras")
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(teacher.params)))
    assert main(["sample", "--workdir", out, "--num", "4", "--batch-size", "4"]) == 0


@pytest.mark.parametrize("override, message", [
    ({"reward": "jpeg_incompressibility"}, "not differentiable"),
    ({"reward": "classifier:digits:label"}, "unconditional"),
    ({"adjoint": "forward"}, "adjoint must be one of"),
    ({"solver": "tsit5"}, "solver for adjoint='backsolve'"),
    ({"adjoint": "scan", "solver": "heun3"}, "solver for adjoint='scan'"),
    ({"adjoint": "scan", "solver": "heun", "steps": 3}, "must be even"),
    ({"batch": 0}, "batch"),
    ({"steps": 0}, "steps"),
    ({"spacing": "cubic"}, "spacing"),
    ({"kl_weight": 0.1}, "unknown adjoint_reward settings"),
])
def test_bad_settings_fail_before_compiling(digits_teacher, tmp_path, override, message):
    import dpmjax.methods

    _, teacher = digits_teacher
    with pytest.raises(ValueError, match=message):
        dpmjax.methods.finetune("adjoint_reward", teacher, method_config(**override), str(tmp_path / "out"),
                                num_devices=1)
    assert not os.path.exists(tmp_path / "out" / "checkpoints") or not os.listdir(tmp_path / "out" / "checkpoints")
