"""Reward-finetuning objectives (dpmjax/methods/reward_objectives.py) against loops written out in numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.methods import reward_objectives as ro


def random_batch(seed, groups=3, n=4, steps=5):
    rng = np.random.default_rng(seed)
    ref = rng.normal(-50.0, 3.0, (groups, n, steps))
    old = ref + rng.normal(0.0, 0.02, ref.shape)
    new = old + rng.normal(0.0, 0.02, ref.shape)
    rewards = rng.normal(0.0, 1.0, (groups, n))
    return new.astype(np.float32), old.astype(np.float32), ref.astype(np.float32), rewards.astype(np.float32)


def numpy_prdp(new, old, ref, rewards, beta, eps):
    losses = []
    for g in range(new.shape[0]):
        for a in range(new.shape[1]):
            for b in range(new.shape[1]):
                if not rewards[g, a] > rewards[g, b]:
                    continue
                target = (rewards[g, a] - rewards[g, b]) / beta
                r = lambda i: np.mean(new[g, i] - ref[g, i])  # noqa: E731
                rc = lambda i: np.mean(np.clip(new[g, i] - ref[g, i], old[g, i] - ref[g, i] - eps,  # noqa: E731
                                               old[g, i] - ref[g, i] + eps))
                losses.append(max((r(a) - r(b) - target) ** 2, (rc(a) - rc(b) - target) ** 2))
    return np.mean(losses), len(losses)


@pytest.mark.parametrize("eps", [1e-4, 0.01, 10.0])
def test_prdp_loss_is_the_pairwise_loop(eps):
    new, old, ref, rewards = random_batch(0)
    loss, stats = jax.jit(lambda *a: ro.prdp_loss(*a, beta=30.0, clip_range=eps))(new, old, ref, rewards)
    expected, pairs = numpy_prdp(*(x.astype(np.float64) for x in (new, old, ref, rewards)), 30.0, eps)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    assert int(stats["pairs"]) == pairs == 3 * 6  # every unordered pair of 4 once (no ties)


def test_prdp_loss_is_zero_at_the_optimum_and_pulls_towards_the_better_sample():
    """log-ratios whose pairwise differences equal the reward differences / beta (inside the clip range) give 0;
    from theta = old = ref, a descent step raises the log-likelihood of the best sample and lowers the worst's."""
    rewards = jnp.asarray([[1.0, 0.0, -2.0]])
    beta = 100.0
    ref = jnp.full((1, 3, 4), -10.0)
    optimum = ref + (rewards / beta)[..., None] + 0.3  # any common offset cancels in the differences
    loss, _ = ro.prdp_loss(optimum, optimum, ref, rewards, beta=beta, clip_range=1.0)
    assert float(loss) < 1e-10
    grad = jax.grad(lambda lp: ro.prdp_loss(lp, ref, ref, rewards, beta=beta, clip_range=1.0)[0])(ref)
    assert float(jnp.sum(grad[0, 0])) < 0 < float(jnp.sum(grad[0, 2]))


def test_ddpo_loss_is_the_ppo_clip_loop_and_its_first_gradient_is_reinforces():
    new, old, _, rewards = random_batch(1)
    eps = 0.01
    loss, _ = ro.ddpo_loss(new, old, rewards, clip_range=eps)
    r = rewards.astype(np.float64)
    adv = np.clip((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-8), -5, 5)[..., None]
    rho = np.exp(new.astype(np.float64) - old)
    expected = np.mean(np.maximum(-adv * rho, -adv * np.clip(rho, 1 - eps, 1 + eps)))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4, atol=1e-7)
    # at theta = old (the first update of an epoch) the clip is inactive: d/dlogp = T x REINFORCE's per step
    g_ddpo = jax.grad(lambda lp: ro.ddpo_loss(lp, old, rewards, clip_range=eps)[0])(jnp.asarray(old))
    g_reinforce = jax.grad(lambda lp: ro.reinforce_loss(lp, rewards)[0])(jnp.asarray(old))
    np.testing.assert_allclose(np.asarray(g_ddpo) * old.shape[-1], np.asarray(g_reinforce), rtol=1e-5, atol=1e-9)


def test_group_advantages_are_normalised_per_group_and_clipped():
    adv = np.asarray(ro.group_advantages(jnp.asarray([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]]), adv_clip=1.2))
    np.testing.assert_allclose(adv[0], [-1.2, 0.0, 1.2], atol=1e-6)  # +-1.2247 clipped
    np.testing.assert_allclose(adv[1], [-0.70710677, -0.70710677, 1.2], atol=1e-6)


@pytest.mark.parametrize("lp, r, message", [((2, 3, 4), (2, 4), "groups"), ((2, 3), (2, 3), "groups"),
                                            ((2, 1, 4), (2, 1), "at least 2")])
def test_bad_group_shapes_are_refused(lp, r, message):
    with pytest.raises(ValueError, match=message):
        ro.check_groups(lp, r)
    ro.check_groups((2, 3, 4), (2, 3))
