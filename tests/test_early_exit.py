"""Early exit (dpmjax/nn/dit.py exit heads, dpmjax/methods/early_exit.py): the unmodified DiT without exits, the exit
head against a truncated-DiT oracle, the schedule's per-sample choice, block-evaluation counts, the GO-LSD loss,
the CLI finetune + sample run and the bad settings."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.methods import early_exit
from dpmjax.nn.dit import DiT, block_evaluations, exit_depth

SMALL = dict(patch_size=2, hidden_size=32, depth=4, num_heads=2, freq_dim=32)


def _perturbed(variables, seed):
    """Random non-zero params (a fresh DiT's adaLN-Zero layers would make every block the identity)."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [a + 0.1 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def exit_dit():
    model = DiT(**SMALL, exit_blocks=(1, 2))
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    variables = jax.jit(model.init)(jax.random.key(1), x, jnp.zeros((3,)))  # jitted: eager init dispatches op by op
    return model, jax.jit(_perturbed, static_argnums=1)(variables, 2), x


def test_without_exits_the_dit_is_unchanged_op_for_op(exit_dit):
    """exit_at=None and no schedule: the same output as a DiT built without exit heads (bit for bit), and the
    shared params initialise to the same values (flax derives each param's key from its name)."""
    model, variables, x = exit_dit
    plain = DiT(**SMALL)
    shared = {"params": {n: v for n, v in variables["params"].items() if not n.startswith("exit_")}}
    t = jnp.array([10.0, 500.0, 990.0])
    np.testing.assert_array_equal(jax.jit(model.apply)(variables, x, t), jax.jit(plain.apply)(shared, x, t))
    fresh, fresh_plain = jax.jit(model.init)(jax.random.key(5), x, t), jax.jit(plain.init)(jax.random.key(5), x, t)
    for name, value in fresh_plain["params"].items():
        jax.tree.map(np.testing.assert_array_equal, fresh["params"][name], value)
    assert {"exit_1_adaLN", "exit_1_linear", "exit_2_adaLN", "exit_2_linear"} <= set(fresh["params"])


def test_exit_head_equals_a_truncated_dit_with_that_head_as_its_final_layer(exit_dit):
    """exit_at=k == a depth-k DiT whose blocks are blocks 0..k-1 and whose final layer is head k; return_exits
    gives the same heads and the full output in one pass."""
    model, variables, x = exit_dit
    t = jnp.array([100.0, 400.0, 800.0])
    final, exits = model.apply(variables, x, t, return_exits=True)
    np.testing.assert_allclose(final, model.apply(variables, x, t), atol=1e-6)
    for k in (1, 2):
        p = variables["params"]
        oracle_params = {n: v for n, v in p.items() if n in ("patch_embed", "time_embed")}
        oracle_params.update({f"block_{i}": p[f"block_{i}"] for i in range(k)})
        oracle_params.update(final_adaLN=p[f"exit_{k}_adaLN"], final_linear=p[f"exit_{k}_linear"])
        oracle = DiT(**{**SMALL, "depth": k}).apply({"params": oracle_params}, x, t)
        np.testing.assert_allclose(model.apply(variables, x, t, exit_at=k), oracle, atol=1e-6)
        np.testing.assert_allclose(exits[k], oracle, atol=1e-6)
        assert float(jnp.max(jnp.abs(oracle - final))) > 1e-3  # the heads really differ from the full model
    np.testing.assert_allclose(model.apply(variables, x, t, exit_at=4), final, atol=1e-6)


def test_the_schedule_picks_each_samples_exit_by_its_time(exit_dit):
    """exit_schedule ((500, 2), (800, 1)): t > 800 -> block 1, 500 < t <= 800 -> block 2, else the full depth; per
    sample in a mixed batch, and for a shared t (the samplers' case), jitted."""
    model, variables, x = exit_dit
    scheduled = model.clone(exit_schedule=((500.0, 2), (800.0, 1)))
    np.testing.assert_array_equal(exit_depth(scheduled.exit_schedule, 4, jnp.array([900.0, 800.0, 600.0, 500.0, 1.0])),
                                  [1, 2, 2, 4, 4])
    apply = jax.jit(scheduled.apply)
    for times, depths in (([900.0, 600.0, 100.0], [1, 2, 4]), ([100.0, 900.0, 700.0], [4, 1, 2]),
                          ([950.0] * 3, [1] * 3), ([650.0] * 3, [2] * 3), ([50.0] * 3, [4] * 3)):
        out = apply(variables, x, jnp.array(times))
        for i, k in enumerate(depths):
            reference = model.apply(variables, x, jnp.array(times), exit_at=k)
            np.testing.assert_allclose(out[i], reference[i], atol=1e-5)  # one compiled program vs another: few ulps


def test_block_evaluations_count_the_depth_of_every_model_call():
    schedule = ((500.0, 2), (800.0, 1))
    assert block_evaluations(schedule, 4, [900.0, 700.0, 300.0]) == 1 + 2 + 4
    assert block_evaluations((), 6, np.linspace(999.0, 0.0, 10)) == 10 * 6  # the full model: NFE x depth
    assert block_evaluations(((0.0, 3),), 6, [5.0, 0.0]) == 3 + 6          # strictly above the threshold


def test_the_loss_is_denoising_plus_exit_plus_stop_gradient_distillation():
    """L = mse(f, y) + w_e sum_k mse(f_k, y) + w_d sum_k mse(f_k, sg(f)); the distillation moves only the heads."""
    rng = np.random.default_rng(0)
    final, target, head_a, head_b = (jnp.asarray(rng.normal(size=(2, 4, 4, 1)), jnp.float32) for _ in range(4))
    exits = {1: head_a, 2: head_b}
    value, scalars = early_exit.exit_loss(final, exits, target, exit_loss_weight=0.5, distill_weight=2.0)
    mse = lambda a, b: float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))  # noqa: E731
    expected = mse(final, target) + 0.5 * (mse(head_a, target) + mse(head_b, target)) + 2.0 * (
        mse(head_a, final) + mse(head_b, final))
    assert float(value) == pytest.approx(expected, rel=1e-5)
    assert float(scalars["distill"]) == pytest.approx(mse(head_a, final) + mse(head_b, final), rel=1e-5)
    grad_final = jax.grad(lambda f: early_exit.exit_loss(f, exits, target, exit_loss_weight=0.0,
                                                         distill_weight=3.0)[0])(final)
    np.testing.assert_allclose(grad_final, 2.0 * (final - target) / final.size, rtol=1e-5, atol=1e-7)
    grad_head = jax.grad(lambda h: early_exit.exit_loss(final, {1: h}, target, exit_loss_weight=0.0,
                                                        distill_weight=1.0)[0])(head_a)
    np.testing.assert_allclose(grad_head, 2.0 * (head_a - final) / final.size, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def dit_teacher(tmp_path_factory):
    """A depth-3 DiT (width 32) on 8x8 digits trained 4 steps: mechanics only."""
    from tiny_configs import tiny_dit_config

    from dpmjax.train.loop import train
    from dpmjax.workdir import load_teacher

    config = tiny_dit_config(num_steps=4, checkpoint_every=4)
    with config.unlocked():
        config.model.update(depth=3, hidden_size=32, freq_dim=32)
        config.train.log_every = 2
    workdir = str(tmp_path_factory.mktemp("dit_teacher"))
    train(config, workdir, num_devices=1, quiet=True)
    return workdir, load_teacher(workdir)


def _config(variant="runlocal,exits=1+2,schedule=0.7@1+0.4@2", **method):
    config = load_config(os.path.join(configs_dir(), "methods", "early_exit.py") + ":" + variant)
    with config.unlocked():
        config.method.update(method)
    return config


def test_finetune_cli_then_sample_with_early_exit(dit_teacher, tmp_path):
    """`dpmjax finetune --method early_exit ...:runlocal` then `dpmjax sample`: the output workdir's model has the
    heads and the schedule on the network's time scale, and its loaded network exits at block 1 for t > 0.7."""
    from dpmjax.main import main
    from dpmjax.nn import make_apply_fn, network_time
    from dpmjax.workdir import load_params

    teacher_dir, _ = dit_teacher
    out = str(tmp_path / "exit")
    config = os.path.join(configs_dir(), "methods", "early_exit.py") + ":runlocal,exits=1+2,schedule=0.7@1+0.4@2"
    assert main(["finetune", "--method", "early_exit", "--teacher", teacher_dir, "--workdir", out,
                 "--num-devices", "1", "--config", config]) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")).read().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["distill"]) and line["exit_mse"] > 0 for line in lines)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["model"]["exit_blocks"] == [1, 2]
    model, variables, schedule, _ = load_params(out)
    expected = [[float(network_time(schedule, jnp.float32(0.7))), 1], [float(network_time(schedule, jnp.float32(0.4))), 2]]
    np.testing.assert_allclose(np.asarray(saved["model"]["exit_schedule"], float), expected)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    for t, k in ((0.9, 1), (0.5, 2), (0.1, 3)):
        times = jnp.full((2,), t)
        np.testing.assert_allclose(make_apply_fn(model, schedule)(variables, x, times),
                                   model.apply(variables, x, network_time(schedule, times), exit_at=k), atol=1e-5)
    assert main(["sample", "--workdir", out, "--num", "4", "--batch-size", "4"]) == 0


def test_heads_only_keeps_the_trunk_and_final_layer_of_the_teacher(dit_teacher):
    _, teacher = dit_teacher
    program = early_exit.build(_config(train_trunk=False), teacher)
    state = program.init(program.frozen, jax.random.key(0))
    batch = {"image": jax.random.uniform(jax.random.key(1), (8, 8, 8, 1), minval=-1.0, maxval=1.0),
             "label": jnp.zeros((8,), jnp.int32)}
    for step in range(2):
        state, scalars = jax.jit(program.update)(state, batch, program.frozen, jax.random.key(step))
    for name, value in teacher.params["params"].items():
        jax.tree.map(np.testing.assert_array_equal, state.params["params"][name], value)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params["params"]["exit_1_linear"],
                         teacher.params["params"]["final_linear"])
    assert max(jax.tree.leaves(moved)) > 0 and np.isfinite(float(scalars["loss"]))


@pytest.mark.parametrize("method, message", [
    ({"exit_blocks": (1, 5)}, r"config.method.exit_blocks=\[1, 5\].*\[1, 2\]"),
    ({"exit_blocks": (3,), "exit_schedule": ()}, "config.method.exit_blocks"),
    ({"exit_schedule": ((0.0, 1),)}, r"threshold 0.0 must be a time in \(0, 1\]"),
    ({"exit_schedule": ((1.5, 1),)}, "exit_schedule threshold 1.5"),
    ({"exit_schedule": ((0.5, 2),), "exit_blocks": (1,)}, "exits at block 2, which has no head"),
    ({"distill_weight": -1.0}, "distill_weight"),
    ({"init_heads": "random"}, "init_heads"),
    ({"exit_weight": 1.0}, "unknown early_exit settings"),
])
def test_bad_settings_fail_before_compiling(dit_teacher, tmp_path, method, message):
    import dpmjax.methods

    _, teacher = dit_teacher
    with pytest.raises(ValueError, match=message):
        dpmjax.methods.finetune("early_exit", teacher, _config(**method), str(tmp_path / "out"), num_devices=1)
    assert not os.path.exists(tmp_path / "out" / "checkpoints") or not os.listdir(tmp_path / "out" / "checkpoints")


def test_a_non_dit_teacher_and_a_bad_exit_depth_are_refused():
    from tiny_configs import tiny_unet_config

    from dpmjax.methods import abstract_teacher

    unet = tiny_unet_config()
    teacher = abstract_teacher({"model": unet.model.to_dict(), "schedule": unet.schedule.to_dict(),
                                "data": unet.data.to_dict(), "target": "eps"})
    with pytest.raises(ValueError, match="kind='unet'"):
        early_exit.validate(_config(), teacher)
    x = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(ValueError, match="exit_at=3"):
        jax.eval_shape(lambda: DiT(**SMALL, exit_blocks=(1,)).init(jax.random.key(0), x, jnp.zeros((1,)), exit_at=3))
    with pytest.raises(ValueError, match=r"model.exit_blocks=\[4\]"):
        jax.eval_shape(lambda: DiT(**SMALL, exit_blocks=(4,)).init(jax.random.key(0), x, jnp.zeros((1,))))


def test_the_cifar10_config_builds_on_a_dit_s2_teacher_shapes_only():
    """configs/methods/early_exit_cifar10.py validates, builds and traces one update (shapes only) on an abstract
    DiT-S/2 CIFAR-10 teacher."""
    from dpmjax.methods import abstract_teacher

    teacher = abstract_teacher({
        "model": dict(kind="dit", patch_size=2, hidden_size=384, depth=12, num_heads=6, freq_dim=256,
                      num_classes=None, label_dropout=0.0, bfloat16=True),
        "schedule": {"name": "linear", "num_train_timesteps": 1000},
        "data": {"name": "tfds:cifar10", "image_shape": [32, 32, 3]}, "target": "eps"})
    config = load_config(os.path.join(configs_dir(), "methods", "early_exit_cifar10.py"))
    early_exit.validate(config, teacher)
    program = early_exit.build(config, teacher)
    assert program.output["model"]["exit_blocks"] == [4, 8]
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    assert {"exit_4_adaLN", "exit_8_linear"} <= set(state.params["params"])
    batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32), "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
    new, scalars = jax.eval_shape(program.update, state, batch, program.frozen, jax.random.key(1))
    assert jax.tree.map(lambda s: s.shape, new) == jax.tree.map(lambda s: s.shape, state)
    assert scalars["loss"].shape == () and scalars["distill"].shape == ()
