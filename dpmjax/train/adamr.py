"""AdamR: Adam with a decoupled pull toward the pretrained weights (DAREx-L2's finetuning optimizer).

    tx = optax.chain(optax.clip_by_global_norm(1.0), adamr(learning_rate=5e-4, pull=0.1))
    updates, state = tx.update(grads, state, params, anchor=teacher_params)     # the anchor is an argument
    params = optax.apply_updates(params, updates)

Deng et al., "DARE the Extreme" (ICLR 2025, arXiv 2410.09344) sec. 4.2 and the official ``AdamR.py`` (L2 variant),
itself AdamS's "stable weight decay" (Xie et al. 2023) aimed at theta_pre instead of 0. At step k, with the Adam
moments m_k, v_k of the gradient g_k and v_hat = v_k / (1 - beta2^k):

    s_k      = sqrt( mean over *all* entries of all leaves of v_hat )      (1 when it is 0)
    theta   <- theta - lr_k * lambda / s_k * (theta - theta_pre)           (L2; ``l1=True``: sign(theta - theta_pre))
    theta   <- theta - lr_k / (1 - beta1^k) * m_k / (sqrt(v_hat) + eps)   (Adam, as ``optax.adam``)

The pull shrinks the delta theta - theta_pre (its mean and variance) during finetuning, so DARE's random drop
survives extreme rates (the paper's DAREx-L2 = AdamR finetuning, then DARE). Dividing by s_k makes the pull
commensurate with Adam's normalised step (AdamS). lambda = 0 is exactly ``optax.adam`` (the update is
-lr m_hat / (sqrt(v_hat) + eps) in both; eps outside the square root).

The anchor theta_pre is an argument of ``update`` (``anchor=``; optax's extra-args protocol, which ``optax.chain``
forwards), never stored in the state nor closed over: a jitted step takes the teacher's params as an argument.
The official code applies the pull before Adam's step on the same parameters; both read theta before the
update, so the sum of the two terms above is the update returned here.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["AdamRState", "adamr"]


class AdamRState(NamedTuple):
    count: jax.Array   # [] int32: updates done
    mu: optax.Updates  # first moments, like the params
    nu: optax.Updates  # second moments, like the params


def adamr(learning_rate, pull: float, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          l1: bool = False) -> optax.GradientTransformationExtraArgs:
    """AdamR (module docstring): ``learning_rate`` a float or an optax schedule of the step count (read before the
    count is incremented, as ``optax.scale_by_learning_rate``); ``pull`` lambda >= 0; ``update(grads, state,
    params, *, anchor)`` needs ``params`` and the pretrained ``anchor`` (same structure)."""
    if not pull >= 0.0:
        raise ValueError(f"the AdamR pull lambda must be >= 0, got {pull!r}")

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamRState(count=jnp.zeros((), jnp.int32), mu=zeros, nu=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None, *, anchor=None, **extra):
        del extra
        if params is None or anchor is None:
            raise ValueError("adamr's update needs the params and anchor= (the pretrained weights)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, grads)
        step = count.astype(jnp.float32)
        correction1, correction2 = 1.0 - b1 ** step, 1.0 - b2 ** step
        nu_hat = jax.tree.map(lambda v: v / correction2.astype(v.dtype), nu)
        leaves = jax.tree.leaves(nu_hat)
        total = sum(jnp.sum(v.astype(jnp.float32)) for v in leaves)
        size = sum(v.size for v in leaves)
        mean_sqrt = jnp.sqrt(total / size)
        mean_sqrt = jnp.where(mean_sqrt == 0.0, 1.0, mean_sqrt)

        def leaf_update(m, v_hat, theta, theta_pre):
            adam = -lr * ((m / correction1.astype(m.dtype)) / (jnp.sqrt(v_hat) + eps))  # optax.adam's order
            offset = theta - theta_pre
            pull_term = -(lr * pull / mean_sqrt) * (jnp.sign(offset) if l1 else offset)
            return (adam + pull_term.astype(adam.dtype)).astype(theta.dtype)

        updates = jax.tree.map(leaf_update, mu, nu_hat, params, anchor)
        return updates, AdamRState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init, update)
