"""The objectives of reward finetuning on sampled trajectories: PRDP, and its baselines DDPO (PPO clip) and
REINFORCE. Pure functions of per-step log-probabilities (``dpmjax.samplers.policy``) and rewards.

Shapes: trajectories come in G groups (a prompt / class each) of n samples: log-probabilities [G, n, T] (T
policy steps), rewards [G, n].

PRDP (Deng et al. 2024, Sec. 3-4, the loss of their Appendix G). From the KL-regularised objective
max E[r] - beta KL(pi_theta || pi_ref) the optimum satisfies, for two trajectories a, b of one prompt,
r_hat(a) - r_hat(b) = (r(a) - r(b)) / beta with r_hat = log pi_theta / pi_ref (the log partition cancels), so

    r_hat_theta(x) = mean_t [log pi_theta(x_{t-1} | x_t) - log pi_ref(x_{t-1} | x_t)]          (mean over T,
                     as their JAX code: beta absorbs the factor T of the sum in Sec. 3)
    clipped:         each per-step log-ratio clipped to [log pi_old/pi_ref - eps, log pi_old/pi_ref + eps]
    L = mean over pairs (a, b) of one group with r(a) > r(b) of
        max( (r_hat(a) - r_hat(b) - (r(a) - r(b)) / beta)^2 , (same with the clipped r_hat)^2 )

DDPO-clip (Black et al. 2023, Sec. 4.3, their official ``ddpo-pytorch`` defaults): per-group normalised
advantages A = (r - mean_group r) / (std_group r + 1e-8) clipped to [-adv_clip, adv_clip]; per-step ratio
rho_t = exp(log pi_theta - log pi_old);  L = mean_{b,t} max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps)).
With theta = old (the first update of an epoch) its gradient is REINFORCE's.

REINFORCE (DDPO_SF, the score-function estimator): L = -mean_b A_b sum_t log pi_theta(x_t-1 | x_t), one
update per batch of samples (no importance ratio).
"""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["group_advantages", "prdp_loss", "ddpo_loss", "reinforce_loss", "check_groups"]


def check_groups(log_probs_shape, rewards_shape) -> None:
    """Raise ``ValueError`` unless log-probabilities are [G, n, T] and rewards [G, n] with n >= 2 (host-side)."""
    lp, r = tuple(log_probs_shape), tuple(rewards_shape)
    if len(lp) != 3 or len(r) != 2 or lp[:2] != r:
        raise ValueError(f"log-probabilities must be [G, n, T] and rewards [G, n] (G groups of n samples), got "
                         f"{lp} and {r}")
    if r[1] < 2:
        raise ValueError(f"each group needs at least 2 samples (pairs within a group / a group baseline), got n = "
                         f"{r[1]}")


def group_advantages(rewards, *, adv_clip: float = 5.0, eps: float = 1e-8):
    """(r - mean_group r) / (std_group r + eps), clipped to [-adv_clip, adv_clip]: [G, n] (DDPO's per-prompt
    stat tracking within one batch)."""
    rewards = jnp.asarray(rewards, jnp.float32)
    mean = jnp.mean(rewards, axis=1, keepdims=True)
    std = jnp.std(rewards, axis=1, keepdims=True)
    return jnp.clip((rewards - mean) / (std + eps), -adv_clip, adv_clip)


def prdp_loss(log_probs, log_probs_old, log_probs_ref, rewards, *, beta: float, clip_range: float):
    """PRDP's proximal reward-difference-prediction loss (scalar); see the module docstring.

    Args:
      log_probs: [G, n, T] under the params being trained; log_probs_old: [G, n, T] under the epoch's snapshot
        (the sampling params); log_probs_ref: [G, n, T] under the frozen reference (the pretrained model).
      rewards: [G, n]; beta > 0: the KL weight; clip_range >= 0: eps of the per-step proximal clip.
    Returns (loss, stats) with stats {"pairs": number of pairs with r(a) > r(b), "clip_fraction": share of
    per-step log-ratios outside the clip range}.
    """
    log_probs = jnp.asarray(log_probs, jnp.float32)
    ratio = log_probs - jnp.asarray(log_probs_ref, jnp.float32)
    ratio_old = jnp.asarray(log_probs_old, jnp.float32) - jnp.asarray(log_probs_ref, jnp.float32)
    clipped = jnp.clip(ratio, ratio_old - clip_range, ratio_old + clip_range)
    r_hat, r_hat_clipped = jnp.mean(ratio, axis=-1), jnp.mean(clipped, axis=-1)   # [G, n]
    rewards = jnp.asarray(rewards, jnp.float32)
    target = (rewards[:, :, None] - rewards[:, None, :]) / beta                    # [G, n, n]: (a, b)
    pred = r_hat[:, :, None] - r_hat[:, None, :]
    pred_clipped = r_hat_clipped[:, :, None] - r_hat_clipped[:, None, :]
    per_pair = jnp.maximum((pred - target) ** 2, (pred_clipped - target) ** 2)
    mask = (rewards[:, :, None] - rewards[:, None, :] > 0).astype(jnp.float32)     # each unordered pair once
    pairs = jnp.sum(mask)
    loss = jnp.sum(per_pair * mask) / jnp.maximum(pairs, 1.0)
    clip_fraction = jnp.mean((jnp.abs(ratio - ratio_old) > clip_range).astype(jnp.float32))
    return loss, {"pairs": pairs, "clip_fraction": clip_fraction}


def ddpo_loss(log_probs, log_probs_old, rewards, *, clip_range: float, adv_clip: float = 5.0):
    """DDPO's PPO-clip loss (scalar) and stats {"clip_fraction", "approx_kl"}; see the module docstring."""
    advantages = group_advantages(rewards, adv_clip=adv_clip)[..., None]           # [G, n, 1]
    log_ratio = jnp.asarray(log_probs, jnp.float32) - jnp.asarray(log_probs_old, jnp.float32)
    rho = jnp.exp(log_ratio)
    loss = jnp.mean(jnp.maximum(-advantages * rho, -advantages * jnp.clip(rho, 1.0 - clip_range, 1.0 + clip_range)))
    return loss, {"clip_fraction": jnp.mean((jnp.abs(rho - 1.0) > clip_range).astype(jnp.float32)),
                  "approx_kl": 0.5 * jnp.mean(log_ratio ** 2)}


def reinforce_loss(log_probs, rewards, *, adv_clip: float = 5.0):
    """REINFORCE with the per-group baseline (scalar): -mean_b A_b sum_t log pi(x_{t-1} | x_t)."""
    advantages = group_advantages(rewards, adv_clip=adv_clip)
    return -jnp.mean(advantages * jnp.sum(jnp.asarray(log_probs, jnp.float32), axis=-1)), {}
