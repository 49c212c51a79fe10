"""DDPO: denoising diffusion policy optimisation (Black, Janner, Du, Kostrikov, Levine, ICLR 2024, arXiv
2305.13301), the baselines of PRDP.

Each sampler step is an action of a Gaussian policy (``dpmjax.samplers.policy``); on the online loop of
``online_rl`` (sample G x n trajectories with pi_old, reward them, K updates):

  objective="ppo"  (DDPO_IS):  L = mean_{b,t} max(-A_b rho_t, -A_b clip(rho_t, 1 - eps, 1 + eps)),
                               rho_t = pi_theta / pi_old of step t, A = per-group normalised rewards clipped to
                               +-adv_clip (the official per-prompt stat tracking, within one batch here)
  objective="reinforce" (DDPO_SF): L = -mean_b A_b sum_t log pi_theta(x_{t-1} | x_t)  (use K = 1: the score
                               function estimator is unbiased only at theta = pi_old)

Defaults follow the official ddpo-pytorch config: clip_range 1e-4, adv_clip 5. The losses are
``reward_objectives.ddpo_loss`` / ``reinforce_loss``.
"""
from __future__ import annotations

import numpy as np

from dpmjax.methods.online_rl import make_method
from dpmjax.methods.reward_objectives import ddpo_loss, reinforce_loss

__all__ = ["METHOD", "DEFAULTS", "OBJECTIVES"]

DEFAULTS = dict(objective="ppo", clip_range=1e-4, adv_clip=5.0)
OBJECTIVES = ("ppo", "reinforce")


def _check(m) -> None:
    if m["objective"] not in OBJECTIVES:
        raise ValueError(f"config.method.objective must be one of {OBJECTIVES}, got {m['objective']!r}")
    for name in ("clip_range", "adv_clip"):
        value = m[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value) or value <= 0:
            raise ValueError(f"config.method.{name} must be a positive number, got {value!r}")


def _objective(m, log_probs, log_probs_old, log_probs_ref, rewards):
    del log_probs_ref  # DDPO has no reference term
    # the PPO loss's own stats (clip fraction, approx KL) are logged for both objectives: for REINFORCE they
    # measure how far pi_theta has moved from the sampling policy
    ppo_loss, stats = ddpo_loss(log_probs, log_probs_old, rewards, clip_range=float(m["clip_range"]),
                                adv_clip=float(m["adv_clip"]))
    if m["objective"] == "reinforce":
        return reinforce_loss(log_probs, rewards, adv_clip=float(m["adv_clip"]))[0], stats
    return ppo_loss, stats


METHOD = make_method("ddpo", "DDPO: policy-gradient reward finetuning (PPO clip, or REINFORCE)", DEFAULTS, _check,
                     _objective, ("approx_kl", "clip_fraction"))
