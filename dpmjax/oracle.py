"""Gaussian-mixture data: exact eps(x, t), exact samples and densities, and a reference ODE solve.

For p_0 = sum_k w_k N(mu_k, diag(s_k^2)), the marginal under any schedule is again a mixture:
p_t(x) = sum_k w_k N(x; alpha_t mu_k, diag(alpha_t^2 s_k^2 + sigma_t^2)). In the VE variables
y = x / alpha and sigma_ve = sigma / alpha = e^{-lambda} the noise prediction depends on (y, sigma_ve) only,

    eps(y, sigma_ve) = sigma_ve sum_k r_k(y) (y - mu_k) / (s_k^2 + sigma_ve^2),

so the probability-flow ODE dy/d(sigma_ve) = eps (DPM-Solver eq. 3.4, after the change of variables) is the
same for every schedule. ``ode_solution`` integrates it in lambda with diffrax at tight tolerance in float64.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dpmjax import parameterization

__all__ = ["GaussianMixture", "ode_solution"]


@struct.dataclass
class GaussianMixture:
    """A mixture of diagonal Gaussians in D dimensions.

    Fields:
      means:   [K, D]
      stds:    [K, D]  per-dimension standard deviations (> 0)
      weights: [K]     mixture weights (sum to 1)
    Build with ``GaussianMixture.create(means, stds, weights)``, which validates and broadcasts.
    """

    means: jax.Array
    stds: jax.Array
    weights: jax.Array

    @classmethod
    def create(cls, means, stds, weights=None) -> "GaussianMixture":
        means = np.asarray(means, dtype=np.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {means.shape}")
        k, d = means.shape
        stds = np.asarray(stds, dtype=np.float64)
        if stds.ndim == 0:
            stds = np.full((k, d), float(stds))
        elif stds.shape == (k,):
            stds = np.repeat(stds[:, None], d, axis=1)
        elif stds.shape != (k, d):
            raise ValueError(f"stds must be a scalar, shape [K]=({k},) or [K, D]=({k}, {d}), got {stds.shape}")
        if np.any(stds <= 0):
            raise ValueError("stds must be positive")
        weights = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape [K]=({k},), got {weights.shape}")
        if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
            raise ValueError("weights must be non-negative and sum to 1")
        return cls(means=means, stds=stds, weights=weights)

    @classmethod
    def ring(cls, num_modes: int = 8, radius: float = 2.0, std: float = 0.3) -> "GaussianMixture":
        """The classic 2-d benchmark: ``num_modes`` equal modes on a circle."""
        angles = 2 * np.pi * np.arange(num_modes) / num_modes
        return cls.create(radius * np.stack([np.cos(angles), np.sin(angles)], 1), std)

    @classmethod
    def random(cls, seed: int, num_modes: int, dim: int, scale: float = 1.0,
               std_range=(0.2, 0.6)) -> "GaussianMixture":
        """A reproducible random mixture (means ~ N(0, scale^2), stds uniform in ``std_range``)."""
        rng = np.random.default_rng(seed)
        means = scale * rng.standard_normal((num_modes, dim))
        stds = rng.uniform(*std_range, size=(num_modes, dim))
        weights = rng.dirichlet(np.full(num_modes, 5.0))
        return cls.create(means, stds, weights)

    @property
    def dim(self) -> int:
        return int(np.shape(self.means)[1])

    # -- exact quantities in VE coordinates --------------------------------------------------------

    def _component_log_probs(self, y, sigma_ve):
        """log(w_k N(y; mu_k, s_k^2 + sigma_ve^2)) for each k: [B, K]; also the variances [B, K, D]."""
        dtype = y.dtype
        means, stds, weights = (jnp.asarray(a, dtype) for a in (self.means, self.stds, self.weights))
        var = stds[None] ** 2 + sigma_ve.reshape(-1, 1, 1) ** 2  # [B, K, D]
        diff = y[:, None, :] - means[None]
        log_n = -0.5 * jnp.sum(diff ** 2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
        return jnp.log(weights)[None] + log_n, var, diff

    def eps_ve(self, y, sigma_ve):
        """Exact eps as a function of y = x/alpha and sigma_ve = sigma/alpha ([B] or scalar)."""
        sigma_ve = jnp.broadcast_to(jnp.asarray(sigma_ve, y.dtype), y.shape[:1])
        logp, var, diff = self._component_log_probs(y, sigma_ve)
        resp = jax.nn.softmax(logp, axis=-1)
        return sigma_ve[:, None] * jnp.sum(resp[..., None] * diff / var, axis=1)

    # -- exact quantities under a schedule --------------------------------------------------------

    def _flatten(self, x):
        if x.shape[-1] != self.dim and int(np.prod(x.shape[1:])) != self.dim:
            raise ValueError(f"x must have shape [B, {self.dim}] (or flatten to it), got {x.shape}")
        return x.reshape(x.shape[0], self.dim)

    def eps(self, x, t, schedule):
        """The exact noise prediction eps(x_t, t) = -sigma_t grad log p_t(x_t)."""
        flat = self._flatten(x)
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        alpha = schedule.alpha(t)[:, None]
        return self.eps_ve(flat / alpha, schedule.sigma_ve(t)).reshape(x.shape)

    def log_prob(self, x, t=None, schedule=None):
        """log p_t(x) (log p_0 when t is None)."""
        flat = self._flatten(x)
        if t is None:
            logp, _, _ = self._component_log_probs(flat, jnp.zeros(flat.shape[:1], flat.dtype))
            return jax.nn.logsumexp(logp, axis=-1)
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        alpha = schedule.alpha(t)
        logp, _, _ = self._component_log_probs(flat / alpha[:, None], schedule.sigma_ve(t))
        # change of variables x = alpha y: log p(x) = log p(y) - D log alpha
        return jax.nn.logsumexp(logp, axis=-1) - self.dim * jnp.log(alpha)

    def score(self, x, t, schedule):
        return -self.eps(x, t, schedule) / parameterization.expand_like(
            schedule.sigma(jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])), x)

    def predict(self, x, t, schedule, prediction: str = "eps"):
        """The exact model output of any parameterisation (eps, x0, v, score, flow)."""
        return parameterization.convert(self.eps(x, t, schedule), x, t, schedule, "eps", prediction)

    def model_fn(self, schedule, prediction: str = "eps") -> Callable:
        """A ``model_fn(x, t)`` returning the exact prediction: the perfect model samplers are tested on."""
        parameterization.check_prediction(prediction)
        return lambda x, t: self.predict(x, t, schedule, prediction)

    def sample(self, key, num: int, dtype=jnp.float32):
        """Exact samples of p_0: [num, D]."""
        k_comp, k_noise = jax.random.split(key)
        comp = jax.random.choice(k_comp, np.shape(self.weights)[0], (num,), p=jnp.asarray(self.weights, dtype))
        z = jax.random.normal(k_noise, (num, self.dim), dtype)
        return jnp.asarray(self.means, dtype)[comp] + jnp.asarray(self.stds, dtype)[comp] * z

    def mean(self) -> np.ndarray:
        return np.asarray(self.weights) @ np.asarray(self.means)

    def covariance(self) -> np.ndarray:
        w, mu, s = (np.asarray(a) for a in (self.weights, self.means, self.stds))
        m = w @ mu
        second = np.einsum("k,kd,ke->de", w, mu, mu) + np.diag(w @ s ** 2)
        return second - np.outer(m, m)


def ode_solution(mixture: GaussianMixture, x_T, t_from, t_to, schedule, *, rtol: float = 1e-11,
                 atol: float = 1e-11, max_steps: int = 100_000) -> np.ndarray:
    """The exact probability-flow ODE map x_{t_from} -> x_{t_to}, in float64 (the samplers' reference).

    Solves dy/dlambda = -e^{-lambda} eps(y, e^{-lambda}) with y = x/alpha (DPM-Solver eq. 3.4) by diffrax's
    Dopri8 with a PID controller at rtol = atol = 1e-11. Works forward (t_to > t_from) and backward.
    ``t_to`` may be ``"zero"`` for the end point sigma = 0 (lambda = +inf), reached as the limit of y.
    """
    import diffrax

    with jax.enable_x64(True):
        x = jnp.asarray(np.asarray(x_T), jnp.float64)
        shape = x.shape
        flat = x.reshape(shape[0], -1)
        schedule.check_times(np.asarray(t_from), name="t_from")
        lam_from = float(schedule.lambda_(jnp.float64(t_from)))
        to_zero = isinstance(t_to, str)
        if to_zero:
            if t_to != "zero":
                raise ValueError(f"t_to must be a time or 'zero', got {t_to!r}")
            # beyond lambda = 20 the remaining integral is below 1e-9 * |eps|: integrate to there.
            lam_to = max(20.0, lam_from + 1.0)
        else:
            schedule.check_times(np.asarray(t_to), name="t_to")
            lam_to = float(schedule.lambda_(jnp.float64(t_to)))
        alpha_from = float(schedule.alpha(jnp.float64(t_from)))
        alpha_to = 1.0 if to_zero else float(schedule.alpha(jnp.float64(t_to)))

        def vector_field(lam, y, args):
            return -jnp.exp(-lam) * mixture.eps_ve(y, jnp.exp(-lam))

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field), diffrax.Dopri8(), t0=lam_from, t1=lam_to,
            dt0=(lam_to - lam_from) / 100.0, y0=flat / alpha_from,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps, saveat=diffrax.SaveAt(t1=True))
        y_end = sol.ys[-1]
        return np.asarray(alpha_to * y_end).reshape(shape)
