"""DARE / DAREx delta pruning (dpmjax/methods/dare.py), AdamR (dpmjax/train/adamr.py) and `dpmjax delta prune`:
unbiasedness and exact rescale, magnitude's top-k, the sparse file's round trip and size, AdamR against optax and its
formula, find_q against an oracle of the output change, bad inputs refused before any work."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpmjax.methods import dare


def random_delta(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"params": {"dense": {"kernel": jnp.asarray(rng.normal(0, scale, (24, 16)), jnp.float32),
                                 "bias": jnp.asarray(rng.normal(0, scale, (16,)), jnp.float32)},
                       "conv": {"kernel": jnp.asarray(rng.normal(0, scale, (3, 3, 4, 8)), jnp.float32)}}}


def test_dare_is_unbiased_and_rescales_survivors_exactly():
    """E[d'] = d (mean over 2000 masks within 5 standard errors of the Bernoulli estimator, whose per-entry std is
    |d| sqrt(p / (1 - p) / N)); a survivor is d / (1 - p) to 2 ulps (XLA may divide as a multiplication by the
    reciprocal); the kept share is 1 - p within 5 binomial standard deviations."""
    d, p, num = random_delta(), 0.9, 2000
    keys = jax.random.split(jax.random.key(0), num)
    pruned = jax.vmap(lambda k: dare.dare(d, p, k))(keys)
    for x, y in zip(jax.tree.leaves(d), jax.tree.leaves(pruned)):
        x, y = np.asarray(x), np.asarray(y)
        stderr = np.abs(x) * np.sqrt(p / (1 - p) / num)
        assert np.all(np.abs(y.mean(0) - x) <= 5 * stderr + 1e-7)
        kept = y != 0
        np.testing.assert_allclose(y[kept], np.broadcast_to(x / np.float32(1 - p), y.shape)[kept], rtol=2 ** -22)
        share, n = kept.mean(), kept.size
        assert abs(share - (1 - p)) <= 5 * np.sqrt(p * (1 - p) / n)
    one = dare.dare(d, p, keys[0])  # eager == vmapped, and the same key gives the same mask as dare_q
    again = dare.dare_q(d, p, keys[0], 0.5)
    for a, b, c in zip(jax.tree.leaves(one), jax.tree.leaves(again), jax.tree.leaves(d)):
        np.testing.assert_array_equal(np.asarray(a) != 0, np.asarray(b) != 0)
        kept = np.asarray(b) != 0
        np.testing.assert_allclose(np.asarray(b)[kept], (np.asarray(c) / np.float32(0.5))[kept], rtol=2 ** -22)


def test_p_zero_is_the_identity_and_bad_rates_are_refused():
    d = random_delta()
    for x, y in zip(jax.tree.leaves(d), jax.tree.leaves(dare.dare(d, 0.0, jax.random.key(3)))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(d), jax.tree.leaves(dare.magnitude_prune(d, 0.0))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for bad in (1.0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="drop rate p"):
            dare.dare(d, bad, jax.random.key(0))
        with pytest.raises(ValueError, match="drop rate p"):
            dare.magnitude_prune(d, bad)
    with pytest.raises(ValueError, match=r"q must be in \[1 - p, 1\]"):
        dare.dare_q(d, 0.9, jax.random.key(0), 0.05)


def test_magnitude_keeps_the_largest_entries_per_tensor():
    d = random_delta(1)
    pruned = dare.magnitude_prune(d, 0.75)
    for x, y in zip(jax.tree.leaves(d), jax.tree.leaves(pruned)):
        x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
        k = int(round(0.25 * x.size))
        top = np.argsort(-np.abs(x), kind="stable")[:k]
        expected = np.zeros_like(x)
        expected[top] = x[top]
        np.testing.assert_array_equal(y, expected)  # kept entries unscaled, the rest exactly 0


def test_delta_of_different_architectures_is_refused_naming_the_path():
    base = random_delta()
    other = jax.tree.map(lambda x: x, base)
    other["params"]["conv"]["kernel"] = jnp.zeros((3, 3, 4, 9), jnp.float32)
    with pytest.raises(ValueError, match=r"architectures differ at params/conv/kernel.*\(3, 3, 4, 9\)"):
        dare.delta(other, base)
    missing = {"params": {"dense": base["params"]["dense"]}}
    with pytest.raises(ValueError, match="params/conv/kernel exists only in the base"):
        dare.delta(missing, base)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other)  # shapes alone, nothing loaded
    with pytest.raises(ValueError, match="architectures differ"):
        dare.check_same_architecture(shapes, base)


@pytest.mark.parametrize("p", [0.5, 0.99])
def test_sparse_file_round_trip_is_exact_smaller_and_verified(tmp_path, p):
    """p = 0.5 stores bit masks (1 bit per entry beats a 1-2 byte index), p = 0.99 indices; both load back exactly,
    apply(base, .) = base + pruned, the file is smaller than the dense delta, and a flipped byte is refused."""
    rng = np.random.default_rng(2)
    base, d = ({"params": {"dense": {"kernel": jnp.asarray(rng.normal(0, scale, (64, 128)), jnp.float32),
                                     "bias": jnp.asarray(rng.normal(0, scale, (128,)), jnp.float32)},
                           "conv": {"kernel": jnp.asarray(rng.normal(0, scale, (3, 3, 16, 32)), jnp.float32)}}}
               for scale in (1.0, 1e-2))
    pruned = dare.dare(d, p, jax.random.key(5))
    sparse = dare.sparsify(pruned, info={"variant": "dare", "p": p})
    path = str(tmp_path / "delta.npz")
    size = dare.save(path, sparse)
    dense = dare.dense_nbytes(sparse)
    assert dense == 4 * (64 * 128 + 128 + 3 * 3 * 16 * 32)
    # kept values (4 bytes) + a bit per entry (p = 0.5) or a 2-byte index (p = 0.99), plus ~2 KB of headers
    assert size == os.path.getsize(path) < (1 - p) * dense * (1.0 + (0.5 / 4 if p == 0.5 else 0.5)) + 2500
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary file left behind
    loaded = dare.load(path)
    assert loaded.info == {"variant": "dare", "p": p}
    dense = dare.densify(loaded)
    for x, y in zip(jax.tree.leaves(pruned), jax.tree.leaves(dense)):
        np.testing.assert_array_equal(np.asarray(x), y)
    merged = dare.apply(base, loaded)
    for b, x, m in zip(jax.tree.leaves(base), jax.tree.leaves(pruned), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(b) + np.asarray(x), m)
    with np.load(path, allow_pickle=False) as data:  # what encoding the leaves got
        names = data.files
    assert ("masks" in names) == (p == 0.5)
    assert any(n.startswith("indices_") for n in names) == (p == 0.99)
    raw = bytearray(open(path, "rb").read())
    values = raw.find(np.asarray(sparse.leaves[("params", "conv", "kernel")].values[:2]).tobytes())
    assert values > 0
    raw[values] ^= 0xFF
    bad = str(tmp_path / "bad.npz")
    open(bad, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="corrupt|damaged"):
        dare.load(bad)
    with pytest.raises(ValueError, match="does not fit"):
        dare.apply({"params": {"dense": base["params"]["dense"]}}, loaded)


def test_adamr_with_lambda_zero_is_adam_and_pulls_toward_the_anchor_as_the_formula():
    """lambda = 0: the updates of ``optax.adam`` (same expression order; 8 ulps: optax raises beta to the int32
    count, AdamR to its float32 value, and XLA fuses the two programs differently). lambda > 0: the
    official AdamR L2 step, computed here in float64 numpy: Adam's step plus -lr lambda / sqrt(mean v_hat) (theta -
    theta_pre), v_hat averaged over every entry of every leaf."""
    from dpmjax.train.adamr import adamr

    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
    anchor = jax.tree.map(lambda x: x + 0.5, params)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(4)]
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    with jax.numpy_dtype_promotion("standard"):
        ours, reference = adamr(lr, 0.0), optax.adam(lr)
        s_ours, s_ref = ours.init(params), reference.init(params)
        for g in grads:
            u_ours, s_ours = jax.jit(ours.update)(g, s_ours, params, anchor=anchor)
            u_ref, s_ref = reference.update(g, s_ref, params)
            for x, y in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref)):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=8 * 2 ** -23,
                                           atol=lr * 2 ** -20)  # m_t cancels: error ~ ulps of |update| <= lr

        lam = 0.3
        tx = adamr(lr, lam)
        state, theta = tx.init(params), params
        m = {k: np.zeros(v.shape) for k, v in params.items()}
        v = {k: np.zeros(v.shape) for k, v in params.items()}
        expected = {k: np.asarray(x, np.float64) for k, x in params.items()}
        for step, g in enumerate(grads, start=1):
            updates, state = jax.jit(tx.update)(g, state, theta, anchor=anchor)
            theta = optax.apply_updates(theta, updates)
            for k in params:
                m[k] = b1 * m[k] + (1 - b1) * np.asarray(g[k], np.float64)
                v[k] = b2 * v[k] + (1 - b2) * np.asarray(g[k], np.float64) ** 2
            v_hat = {k: v[k] / (1 - b2 ** step) for k in params}
            s = np.sqrt(np.mean(np.concatenate([x.ravel() for x in v_hat.values()])))
            for k in params:
                pull = -lr * lam / s * (expected[k] - np.asarray(anchor[k], np.float64))
                expected[k] = expected[k] + pull - lr * (m[k] / (1 - b1 ** step)) / (np.sqrt(v_hat[k]) + eps)
        for k in params:  # float32 arithmetic over 4 steps of O(1e-2) updates
            np.testing.assert_allclose(np.asarray(theta[k]), expected[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="anchor"):
        tx.update(grads[0], tx.init(params), params)


class _TinyNet:
    """f(x, t) = tanh(x W1 + t b) W2: a two-layer model whose output change is cheap to compute by hand."""

    @staticmethod
    def apply(params, x, t):
        h = jnp.tanh(x @ params["params"]["l1"]["kernel"] + t[:, None] * params["params"]["l1"]["bias"])
        return h @ params["params"]["l2"]["kernel"]


def test_find_q_returns_the_grid_minimum_of_the_output_change():
    """The oracle: for each q of the grid, dare_q(d, p, key, q) added to the base, run, mean |f_ft - f_q|."""
    rng = np.random.default_rng(4)
    base = {"params": {"l1": {"kernel": jnp.asarray(rng.normal(size=(6, 12)), jnp.float32),
                              "bias": jnp.asarray(rng.normal(size=(12,)), jnp.float32)},
                       "l2": {"kernel": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)}}}
    d = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.3, 0.2, x.shape), jnp.float32), base)  # a biased delta
    x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=(32,)), jnp.float32)
    p, key = 0.9, jax.random.key(11)
    q, grid, changes = dare.find_q(_TinyNet.apply, base, d, p, key, x, t, num_q=11)
    np.testing.assert_allclose(grid, np.linspace(0.1, 1.0, 11))
    reference = _TinyNet.apply(jax.tree.map(jnp.add, base, d), x, t)
    oracle = [float(jnp.mean(jnp.abs(_TinyNet.apply(jax.tree.map(jnp.add, base, dare.dare_q(d, p, key, float(g))),
                                                    x, t) - reference))) for g in grid]
    np.testing.assert_allclose(changes, oracle, rtol=1e-5)  # one jitted lax.map vs eager: float32 reassociation
    assert q == grid[int(np.argmin(oracle))]
    assert 0 < int(np.argmin(oracle))  # the biased delta: DARE's 1/(1-p) is not the best rescale


def test_analytic_q_follows_the_closed_form_and_captures_layer_inputs():
    """With c >= 0 the scanned objective's minimiser is q* = eta phi(p) sum c^2 / (2 (1-p) sum c) (on the 0.001
    grid); layer_input_means returns each Dense / Conv layer's mean input."""
    import flax.linen as nn

    p, eta = 0.9, 0.45
    c = np.abs(np.random.default_rng(0).normal(0.5, 0.1, (1, 50)))
    phi = (1 - 2 * p) / np.log((1 - p) / p)
    q_star = eta * phi * (c ** 2).sum() / (2 * (1 - p) * c.sum())
    assert 1 - p < q_star < 0.99
    q = dare.analytic_q_rows(c, p, eta=eta, stop_fraction=1.0)
    assert abs(q[0] - q_star) <= 0.0011

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, t, train=False):
            return nn.Conv(2, (3, 3), name="conv")(nn.Dense(4, name="dense")(x))

    net = Net()
    x = jax.random.normal(jax.random.key(0), (5, 4, 4, 3))
    variables = net.init(jax.random.key(1), x, jnp.zeros((5,)))
    means = dare.layer_input_means(net, variables, x, jnp.zeros((5,)))
    np.testing.assert_allclose(means[("dense",)], np.asarray(x).reshape(-1, 3).mean(0), rtol=1e-5)
    hidden = nn.Dense(4).apply({"params": variables["params"]["dense"]}, x)
    np.testing.assert_allclose(means[("conv",)], np.asarray(hidden).reshape(-1, 4).mean(0), rtol=1e-5, atol=1e-6)
    qs = dare.analytic_q(jax.tree.map(lambda v: v * 0.1, variables), means, p)
    assert all(1 - p - 1e-9 <= float(v) <= 1.0 for v in jax.tree.leaves(qs))


# ------------------------------------------------------------------------------------------------ the CLI

@pytest.fixture(scope="module")
def adamr_finetune(digits_teacher, tmp_path_factory):
    """A 4-update AdamR full finetune of the test teacher through the CLI (lambda = 0.5)."""
    from dpmjax.config import configs_dir
    from dpmjax.main import main

    teacher_dir, _ = digits_teacher
    out = str(tmp_path_factory.mktemp("dare") / "ft_adamr")
    config = os.path.join(configs_dir(), "methods", "full_finetune.py") + ":runlocal,adamr=0.5"
    assert main(["finetune", "--method", "full_finetune", "--teacher", teacher_dir, "--workdir", out,
                 "--num-devices", "1", "--config", config]) == 0
    return out


def test_delta_prune_cli_writes_a_sampleable_workdir_and_sparse_file(digits_teacher, adamr_finetune, tmp_path,
                                                                     capsys):
    from dpmjax.main import main
    from dpmjax.workdir import load_config_of, load_params

    teacher_dir, teacher = digits_teacher
    _, finetuned, _, config = load_params(adamr_finetune)
    assert config.method.adamr_lambda == 0.5
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(finetuned), jax.tree.leaves(teacher.params)))
    out = str(tmp_path / "pruned")
    assert main(["delta", "prune", "--base", teacher_dir, "--finetuned", adamr_finetune, "--p", "0.9",
                 "--variant", "dare_q", "--seed", "3", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "sparse delta" in printed and "dense:" in printed
    sparse = dare.load(os.path.join(out, dare.DELTA_FILE))
    assert sparse.info["variant"] == "dare_q" and 0.1 <= sparse.info["q"] <= 1.0
    assert os.path.getsize(os.path.join(out, dare.DELTA_FILE)) < dare.dense_nbytes(sparse)
    _, merged, _, out_config = load_params(out)
    expected = dare.apply(teacher.params, sparse)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert load_config_of(out).pretrained.format == dare.PRUNED_FORMAT and out_config.delta.p == 0.9
    assert main(["sample", "--workdir", out, "--num", "4", "--nfe", "2", "--out", str(tmp_path / "s.npz")]) == 0
    assert np.isfinite(np.load(str(tmp_path / "s.npz"))["images"]).all()
    analytic = str(tmp_path / "analytic")  # per-layer q from the layers' inputs on the finetuned data's batch
    assert main(["delta", "prune", "--base", teacher_dir, "--finetuned", adamr_finetune, "--p", "0.99",
                 "--variant", "dare_q_analytic", "--eta", "0.45", "--keep-dense", "norm", "--out", analytic]) == 0
    loaded = dare.load(os.path.join(analytic, dare.DELTA_FILE))
    info = loaded.info
    norms = [names for names in loaded.leaves if any("norm" in n for n in names)]
    assert norms and all(loaded.leaves[names].indices is None for names in norms)  # stored whole
    assert 0.01 - 1e-9 <= info["q_min"] <= info["q_mean"] <= info["q_max"] <= 1.0 and info["eta"] == 0.45


@pytest.mark.parametrize("argv, message", [
    (["--p", "1", "--variant", "dare"], "--p: the drop rate p must be a number in [0, 1), got 1.0"),
    (["--p", "-0.1", "--variant", "dare"], "--p: the drop rate p must be a number in [0, 1), got -0.1"),
    (["--p", "0.9", "--variant", "random"], "invalid choice: 'random'"),
    (["--p", "0.9", "--variant", "dare", "--q", "0.5"], "--q applies to --variant dare_q"),
    (["--p", "0.9", "--variant", "dare_q", "--q", "0.05"], "q must be in [1 - p, 1]"),
])
def test_delta_prune_refuses_bad_arguments_in_one_line(digits_teacher, tmp_path, capsys, argv, message):
    from dpmjax.main import main

    teacher_dir, _ = digits_teacher
    out = str(tmp_path / "never")
    assert main(["delta", "prune", "--base", teacher_dir, "--finetuned", teacher_dir, "--out", out] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpmjax: error: ") and message in err and err.count("\n") == 1, err
    assert not os.path.exists(out)


def test_delta_prune_refuses_other_architectures_and_missing_workdirs(digits_teacher, tmp_path, capsys):
    """A copy of the teacher whose config.json says 24 channels: refused from the configs' shapes, before either
    checkpoint is restored (the copy's checkpoint is never read)."""
    import json

    from dpmjax.main import main

    teacher_dir, _ = digits_teacher
    other = str(tmp_path / "wide")
    os.makedirs(os.path.join(other, "checkpoints", "0"))
    config = json.load(open(os.path.join(teacher_dir, "config.json")))
    config["model"]["model_channels"] = 24
    json.dump(config, open(os.path.join(other, "config.json"), "w"))
    out = str(tmp_path / "never")
    assert main(["delta", "prune", "--base", teacher_dir, "--finetuned", other, "--p", "0.5", "--variant", "dare",
                 "--out", out]) == 2
    err = capsys.readouterr().err
    assert "architectures differ at params/" in err and err.count("\n") == 1 and not os.path.exists(out), err
    assert main(["delta", "prune", "--base", str(tmp_path / "missing"), "--finetuned", teacher_dir, "--p", "0.5",
                 "--variant", "dare", "--out", out]) == 2
    assert "--base: workdir" in capsys.readouterr().err
    shutil.rmtree(other)
