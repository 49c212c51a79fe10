"""SpeedUpNet (dpmjax/nn/layers.py CrossAttentionBlock adapter, dpmjax/nn/unet.py label tokens,
dpmjax/methods/speedupnet.py): the adapter against a formula oracle, a fresh adapter leaving the network unchanged,
per-sample normalisation, the teacher grid and trajectory points, the MSC loss against a loop oracle, training
lowering the loss, the CLI finetune + sample run, plugging into another base, and the bad settings."""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.methods import speedupnet
from dpmjax.nn.layers import CrossAttentionBlock


def _perturbed(variables, seed, scale=0.3):
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [a + scale * jax.random.normal(k, a.shape, a.dtype)
                                        for a, k in zip(leaves, keys)])


def _block_oracle(p, x, context, negative):
    """The adapted block in numpy from its params (module docstring formula), heads = 1."""
    def ln(a, scale, bias):
        mu, var = a.mean(-1, keepdims=True), a.var(-1, keepdims=True)
        return (a - mu) / np.sqrt(var + 1e-5) * scale + bias

    def gn(a, scale, bias, groups):
        b, h, w, c = a.shape
        g = a.reshape(b, h * w, groups, c // groups)
        mu, var = g.mean((1, 3), keepdims=True), g.var((1, 3), keepdims=True)
        return ((g - mu) / np.sqrt(var + 1e-5)).reshape(b, h, w, c) * scale + bias

    def dense(name, a):
        return a @ np.asarray(p[name]["kernel"], np.float64) + np.asarray(p[name]["bias"], np.float64)

    def attention(q, k, v):
        logits = q @ np.swapaxes(k, 1, 2) / np.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        return (weights / weights.sum(-1, keepdims=True)) @ v

    b, h, w, c = x.shape
    def g(name):
        return np.asarray(p[name]["scale"], np.float64), np.asarray(p[name]["bias"], np.float64)

    queries = gn(x, *g("norm"), groups=4).reshape(b, h * w, c)
    q = dense("q", queries)
    ctx, neg = ln(context, *g("context_norm")), ln(negative, *g("context_norm"))
    pos = attention(q, dense("k", ctx), dense("v", ctx))
    neg_out = attention(q, dense("k_neg", neg), dense("v_neg", neg))
    ratio = np.linalg.norm(pos.reshape(b, -1), axis=1) / np.linalg.norm(neg_out.reshape(b, -1), axis=1)
    h_ = pos - (np.asarray(p["neg_alpha"], np.float64) * ratio[:, None, None] * neg_out
                + np.asarray(p["neg_beta"], np.float64))
    return x + dense("proj_out", h_).reshape(b, h, w, c)


def test_the_adapter_block_follows_the_formula_and_starts_as_the_plain_block():
    """With random params the adapted block equals the numpy oracle of h_pos - (alpha |h_pos|/|h_neg| h_neg + beta);
    fresh (alpha = beta = 0) it equals the block without adapter; each sample's normalisation is its own."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (3, 4, 4, 8))
    context = jax.random.normal(keys[1], (3, 2, 6))
    negative = jax.random.normal(keys[2], (3, 2, 6))
    adapted = CrossAttentionBlock(num_groups=4, negative_adapter=True)
    plain = CrossAttentionBlock(num_groups=4)
    variables = adapted.init(jax.random.key(1), x, context, negative)
    shared = {"params": {n: v for n, v in variables["params"].items()
                         if n not in ("k_neg", "v_neg", "neg_alpha", "neg_beta")}}
    shared = _perturbed(shared, 2)
    fresh = {"params": {**variables["params"], **shared["params"]}}
    np.testing.assert_allclose(adapted.apply(fresh, x, context, negative), plain.apply(shared, x, context),
                               atol=1e-6)
    random = _perturbed(variables, 3)
    out = np.asarray(adapted.apply(random, x, context, negative), np.float64)
    oracle = _block_oracle(jax.tree.map(np.asarray, random["params"]), np.asarray(x, np.float64),
                           np.asarray(context, np.float64), np.asarray(negative, np.float64))
    np.testing.assert_allclose(out, oracle, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(out - np.asarray(plain.apply({"params": {n: random["params"][n] for n in shared["params"]}},
                                                      x, context)))) > 1e-2  # the adapter really acts
    alone = adapted.apply(random, x[:1], context[:1], negative[:1])  # the official code's norm would mix the batch
    np.testing.assert_allclose(alone, out[:1], rtol=1e-5, atol=1e-5)


def test_label_tokens_unet_reads_labels_through_cross_attention_only():
    """label_tokens: no label embedding in the time embedding, a token table of num_classes + 1 rows; the output
    depends on the label, y == num_classes equals y=None (the null class)."""
    from dpmjax.nn import build_model, init_params

    model = build_model(dict(kind="unet", model_channels=8, channel_mult=(1,), num_res_blocks=1, num_groups=4,
                             attention_resolutions=(), mid_attention=True, num_classes=3, context_dim=8,
                             label_tokens=2))
    variables = _perturbed(init_params(model, (8, 8, 1), 0), 1)
    assert "label_embed" not in variables["params"]
    assert variables["params"]["label_tokens"]["embedding"]["embedding"].shape == (4, 16)
    x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.full((2,), 500.0)
    a, b = model.apply(variables, x, t, y=jnp.array([0, 3])), model.apply(variables, x, t, y=jnp.array([1, 3]))
    assert float(jnp.max(jnp.abs(a[0] - b[0]))) > 1e-3
    np.testing.assert_allclose(a[1], model.apply(variables, x, t)[1], atol=1e-6)
    with pytest.raises(ValueError, match="give y, not context"):
        model.apply(variables, x, t, context=jnp.zeros((2, 2, 8)))


@pytest.mark.parametrize("model, message", [
    (dict(negative_adapter=True), "model.negative_adapter .*needs cross-attention"),
    (dict(negative_adapter=True, context_dim=8, attention_resolutions=(), mid_attention=False),
     "model.negative_adapter"),
    (dict(label_tokens=2, context_dim=8), "model.label_tokens=2 .*needs model.num_classes"),
])
def test_an_adapter_or_label_tokens_without_cross_attention_is_refused(model, message):
    from dpmjax.nn import build_model

    with pytest.raises(ValueError, match=message):
        build_model(dict(kind="unet", model_channels=8, channel_mult=(1,), num_groups=4, **model))


@pytest.fixture(scope="module")
def xattn_teacher(tmp_path_factory):
    """A tiny UNet whose labels enter as 2 cross-attention tokens (mid-block attention at 8x8), 30 steps: mechanics
    only."""
    from tiny_configs import tiny_unet_config

    from dpmjax.train.loop import train
    from dpmjax.workdir import load_teacher

    config = tiny_unet_config(num_steps=30, checkpoint_every=30, log_every=15)
    with config.unlocked():
        config.model.update(num_classes=10, label_dropout=0.1, context_dim=16, label_tokens=2, mid_attention=True,
                            attention_resolutions=())
        config.data.batch_size = 32
        config.optim.learning_rate = 3e-3
        config.sample.guidance_scale = 2.0
    workdir = str(tmp_path_factory.mktemp("xattn_teacher"))
    train(config, workdir, num_devices=1, quiet=True)
    return workdir, load_teacher(workdir)


def _config(variant="runlocal", **method):
    config = load_config(os.path.join(configs_dir(), "methods", "speedupnet.py") + ":" + variant)
    with config.unlocked():
        config.method.update(method)
    return config


def test_teacher_grid_refines_the_student_grid_uniformly_in_log_snr(xattn_teacher):
    _, teacher = xattn_teacher
    s = speedupnet.settings(_config(teacher_substeps=3), teacher)
    student = speedupnet.student_timesteps(teacher.schedule, s)
    grid = speedupnet.teacher_timesteps(teacher.schedule, s)
    assert len(student) == 5 and len(grid) == 13 and s["spacing"] == teacher.config.sample.spacing
    np.testing.assert_array_equal(grid[::3], student)
    lam = np.asarray(teacher.schedule.lambda_(jnp.asarray(grid, jnp.float32)), np.float64).reshape(-1)
    steps = np.diff(lam)
    for k in range(4):
        np.testing.assert_allclose(steps[3 * k:3 * k + 3], steps[3 * k], rtol=2e-3)


def test_msc_loss_matches_a_loop_oracle():
    """From points[start], m DDIM steps of a known linear 'student' (x0 = 0.5 x), MSE against the next m points."""
    from dpmjax.schedules import LinearVP

    schedule = LinearVP()
    times = jnp.asarray([1.0, 0.6, 0.3, 0.1, 0.01], jnp.float32)
    points = jax.random.normal(jax.random.key(0), (5, 2, 4, 4, 1))

    def apply(params, x, t, y):
        return params * x  # an x0-predicting model

    loss, errors = jax.jit(lambda s: speedupnet.msc_loss(apply, 0.5, points, None, times, s, 2, schedule=schedule,
                                                         prediction="x0"))(1)
    alpha = lambda t: float(jnp.exp(schedule.log_alpha(jnp.float32(t))))  # noqa: E731
    sigma = lambda t: float(jnp.exp(schedule.log_sigma(jnp.float32(t))))  # noqa: E731
    x = np.asarray(points[1], np.float64)
    expected = []
    for j in (1, 2):
        t0, t1 = float(times[j]), float(times[j + 1])
        x0 = 0.5 * x
        x = alpha(t1) * x0 + sigma(t1) * (x - alpha(t0) * x0) / sigma(t0)
        expected.append(np.mean((x - np.asarray(points[j + 1], np.float64)) ** 2))
    np.testing.assert_allclose(errors, expected, rtol=1e-5)
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-5)


def test_fresh_student_is_the_conditional_teacher_and_training_lowers_the_msc_loss(xattn_teacher):
    """init copies k/v into k_neg/v_neg with alpha = beta = 0: the student equals the unguided conditional teacher;
    30 updates lower the loss on a fixed evaluation key, touching only the adapter."""
    from dpmjax.nn import make_apply_fn

    _, teacher = xattn_teacher
    config = _config("runlocal,steps=30", teacher_substeps=2)
    with config.unlocked():
        config.data.batch_size = 16
        config.optim.learning_rate = 1e-2
    program = speedupnet.build(config, teacher)
    state = jax.jit(program.init)(program.frozen, jax.random.key(0))
    flat = flax.traverse_util.flatten_dict(state.params)
    assert {p[-2] if p[-2] in ("k_neg", "v_neg") else p[-1] for p in flat} == set(speedupnet.ADAPTER_LEAVES)
    block = state.params["mid_xattn"]
    np.testing.assert_array_equal(block["k_neg"]["kernel"], teacher.params["params"]["mid_xattn"]["k"]["kernel"])
    student = program.student(state, False, program.frozen)
    x, t, y = jax.random.normal(jax.random.key(1), (4, 8, 8, 1)), jnp.full((4,), 0.5), jnp.arange(4)
    from dpmjax.nn import build_model
    student_apply = make_apply_fn(build_model(speedupnet.student_model_config(teacher)), teacher.schedule)
    np.testing.assert_allclose(student_apply(student, x, t, y=y), teacher.apply_fn()(teacher.params, x, t, y=y),
                               atol=1e-5)
    update = jax.jit(program.update)
    evaluate = jax.jit(lambda params: program.update(state.replace(params=params), None, program.frozen,
                                                     jax.random.key(99))[1]["loss"])
    before = float(evaluate(state.params))
    for step in range(30):
        state, scalars = update(state, None, program.frozen, jax.random.key(step))
        assert np.isfinite(float(scalars["loss"]))
    after = float(evaluate(state.params))
    assert after < 0.9 * before, (before, after)


def test_finetune_cli_then_sample_and_plug_into_another_base(xattn_teacher, tmp_path):
    """`dpmjax finetune --method speedupnet ...:runlocal` then `dpmjax sample --labels`: the output samples with 4
    DDIM steps and no guidance; ``plug`` moves its adapter onto another base and refuses a doubled adapter."""
    from dpmjax.main import main
    from dpmjax.workdir import load_params

    teacher_dir, teacher = xattn_teacher
    out = str(tmp_path / "sun")
    config = os.path.join(configs_dir(), "methods", "speedupnet.py") + ":runlocal"
    assert main(["finetune", "--method", "speedupnet", "--teacher", teacher_dir, "--workdir", out,
                 "--num-devices", "1", "--config", config]) == 0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")).read().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(line["loss"]) for line in lines)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["model"]["negative_adapter"] is True
    assert saved["sample"]["solver"] == "ddim" and saved["sample"]["nfe"] == 4
    assert saved["sample"]["guidance_scale"] == 1.0
    assert main(["sample", "--workdir", out, "--num", "4", "--batch-size", "4", "--labels", "3"]) == 0
    _, variables, _, _ = load_params(out)
    adapter = speedupnet.adapter_of(variables)
    assert set(adapter) == {"mid_xattn"} and set(adapter["mid_xattn"]) == set(speedupnet.ADAPTER_LEAVES)
    other_base = _perturbed(teacher.params, 7, scale=0.01)
    plugged = speedupnet.plug(other_base, adapter)
    np.testing.assert_array_equal(plugged["params"]["mid_xattn"]["neg_alpha"],
                                  variables["params"]["mid_xattn"]["neg_alpha"])
    np.testing.assert_array_equal(plugged["params"]["conv_in"]["kernel"], other_base["params"]["conv_in"]["kernel"])
    with pytest.raises(ValueError, match="already has mid_xattn"):
        speedupnet.plug(plugged, adapter)


@pytest.mark.parametrize("method, message", [
    ({"guidance_scale": 1.0}, "guidance_scale must be a number > 1"),
    ({"msc_steps": 5}, r"msc_steps \(5\) must be at most student_steps \(4\)"),
    ({"student_steps": 0}, "student_steps must be an integer >= 1"),
    ({"init": "zeros"}, "config.method.init"),
    ({"teacher_solver": "dpm_solver_adaptive"}, "teacher_solver"),
    ({"msc": 2}, "unknown speedupnet settings"),
])
def test_bad_settings_fail_before_compiling(xattn_teacher, tmp_path, method, message):
    import dpmjax.methods

    _, teacher = xattn_teacher
    with pytest.raises(ValueError, match=message):
        dpmjax.methods.finetune("speedupnet", teacher, _config(**method), str(tmp_path / "out"), num_devices=1)
    assert not os.path.exists(tmp_path / "out" / "checkpoints") or not os.listdir(tmp_path / "out" / "checkpoints")


def test_a_teacher_without_cross_attention_is_refused(digits_teacher, tmp_path, capsys):
    """The adapter has nowhere to go in the digits UNet (no attention): the error names the missing option, and
    the CLI says it in one line before loading anything else."""
    from dpmjax.main import main

    workdir, teacher = digits_teacher
    with pytest.raises(ValueError, match="UNet with cross-attention .*context_dim=None"):
        speedupnet.validate(_config(), teacher)
    assert main(["finetune", "--method", "speedupnet", "--teacher", workdir, "--workdir", str(tmp_path / "o"),
                 "--config", os.path.join(configs_dir(), "methods", "speedupnet.py") + ":runlocal"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpmjax: error: speedupnet puts its adapter into cross-attention")


def test_the_cifar10_config_builds_on_a_cross_attention_unet_shapes_only():
    """configs/methods/speedupnet_cifar10.py validates, builds and traces one update (shapes only) on an abstract
    teacher from configs/cifar10.py:xattn."""
    from dpmjax.methods import abstract_teacher

    teacher_config = load_config(os.path.join(configs_dir(), "cifar10.py") + ":xattn")
    teacher = abstract_teacher({"model": teacher_config.model.to_dict(), "schedule": teacher_config.schedule.to_dict(),
                                "data": teacher_config.data.to_dict(), "target": "eps"})
    with teacher.config.unlocked():
        teacher.config.sample = dict(guidance_scale=3.0, spacing="logSNR")
    config = load_config(os.path.join(configs_dir(), "methods", "speedupnet_cifar10.py"))
    speedupnet.validate(config, teacher)
    program = speedupnet.build(config, teacher)
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    blocks = {path[0] for path in flax.traverse_util.flatten_dict(state.params)}
    assert blocks == {"down_1_0_xattn", "down_1_1_xattn", "mid_xattn"} | {f"up_1_{i}_xattn" for i in range(3)}
    assert state.params["mid_xattn"]["k_neg"]["kernel"].shape == (256, 256)
    new, scalars = jax.eval_shape(program.update, state, None, program.frozen, jax.random.key(1))
    assert jax.tree.map(lambda s: s.shape, new) == jax.tree.map(lambda s: s.shape, state)
    assert scalars["loss"].shape == ()
