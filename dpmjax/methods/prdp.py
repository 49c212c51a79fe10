"""PRDP: proximal reward difference prediction (Deng, Wang, Wei, Hou, Grundmann, CVPR 2024, arXiv 2402.08714).

Reward finetuning as supervised regression: for two trajectories a, b of one prompt (here: one class, or one
group of an unconditional model) the mean per-step log-ratio r_hat = mean_t log pi_theta / pi_ref must
predict the reward difference / beta,

    L = mean_{(a, b): r(a) > r(b)} max( (r_hat(a) - r_hat(b) - (r(a) - r(b)) / beta)^2 , clipped^2 )

with each per-step log-ratio of the clipped term held within +-clip_range of pi_old's (the proximal update),
on the online loop of ``online_rl`` (PRDP Alg. 1: snapshot pi_old, sample G x n trajectories, reward, K
updates). The loss itself is ``reward_objectives.prdp_loss``. No official training code was released; the
paper's appendix gives the loss as JAX code, which ``prdp_loss`` follows (mean over steps, all pairs within a
group, only pairs with a positive reward difference).

Settings beyond ``online_rl.COMMON_DEFAULTS``: beta (the KL weight; Table 4: 3e-5 small scale, 3e-6 large
scale, for SD rewards of order 0.3), clip_range (eps: 1e-6 small scale, 1e-4 large scale / multi-reward).
Rewards at CPU scale differ in scale from HPSv2's: configs/methods/prdp.py sets beta and eps for its reward.
"""
from __future__ import annotations

import numpy as np

from dpmjax.methods.online_rl import make_method
from dpmjax.methods.reward_objectives import prdp_loss

__all__ = ["METHOD", "DEFAULTS"]

DEFAULTS = dict(beta=0.1, clip_range=1e-3)


def _check(m) -> None:
    for name in ("beta", "clip_range"):
        value = m[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value) or value < 0 or (name == "beta" and value == 0):
            raise ValueError(f"config.method.{name} must be a {'positive' if name == 'beta' else 'non-negative'} "
                             f"number, got {value!r}")


def _objective(m, log_probs, log_probs_old, log_probs_ref, rewards):
    return prdp_loss(log_probs, log_probs_old, log_probs_ref, rewards, beta=float(m["beta"]),
                     clip_range=float(m["clip_range"]))


METHOD = make_method("prdp", "PRDP: reward finetuning by proximal reward-difference prediction (online)", DEFAULTS,
                     _check, _objective, ("pairs", "clip_fraction"))
