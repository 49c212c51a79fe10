"""Noise schedules x_t = alpha(t) x_0 + sigma(t) eps, and the time grids samplers walk on.

Every schedule is a small immutable pytree (``flax.struct.dataclass``) with

    log_alpha(t), log_sigma(t), alpha(t), sigma(t),
    lambda_(t) = log alpha(t) - log sigma(t)        (half log-SNR, DPM-Solver eq. 3.2)
    t_of_lambda(lam)                                 (its inverse)

and the time range ``[t_min, t_max]`` on which they are defined. Time is continuous; discrete-time
models follow the official DPM-Solver convention t_n = (n + 1) / N (see ``DiscreteVP``).

All methods are pure jnp code: jittable, differentiable, and computed in the dtype of ``t``.
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "DiscreteVP", "LinearVP", "CosineVP", "FlowMatching", "SCHEDULES", "SPACINGS",
    "time_grid", "validate_timesteps", "betas_for_name", "lambda_on_host", "t_of_lambda_on_host",
    "schedule_from_name", "schedule_from_config", "SCHEDULE_NAMES",
]

BETA_SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine")


def _as_float(t):
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    return t


def _log_sigma_from_log_alpha(log_alpha):
    """log sigma = 1/2 log(1 - alpha^2) for variance-preserving schedules, accurate near alpha = 1."""
    return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def _log_alpha_from_lambda_vp(lam):
    """VP: alpha^2 = sigmoid(2 lambda) => log alpha = -1/2 log(1 + e^{-2 lambda})."""
    return -0.5 * jnp.logaddexp(jnp.zeros_like(lam), -2.0 * lam)


class _Schedule:
    """Methods shared by every schedule; subclasses define ``log_alpha`` and ``log_sigma``."""

    t_min: float
    t_max: float

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return jnp.exp(self.log_sigma(t))

    def lambda_(self, t):
        """Half log-SNR lambda(t) = log(alpha_t / sigma_t); decreasing in t."""
        return self.log_alpha(t) - self.log_sigma(t)

    def sigma_ve(self, t):
        """sigma_t / alpha_t = exp(-lambda_t): the noise level in k-diffusion's (VE/EDM) convention."""
        return jnp.exp(-self.lambda_(t))

    @property
    def time_range(self) -> tuple[float, float]:
        return float(self.t_min), float(self.t_max)

    @property
    def default_t_start(self) -> float:
        return float(self.t_max)

    @property
    def default_t_end(self) -> float:
        return float(self.t_min)

    def check_times(self, t, *, name: str = "t") -> None:
        """Raise ``ValueError`` if concrete times lie outside ``[t_min, t_max]`` (no-op under tracing)."""
        if isinstance(t, jax.core.Tracer):
            return
        arr = np.asarray(t, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite, got {arr}")
        lo, hi = self.time_range
        slack = 1e-6 * max(1.0, hi)
        if arr.size and (arr.min() < lo - slack or arr.max() > hi + slack):
            raise ValueError(
                f"{name} must lie in [{lo:g}, {hi:g}] for {type(self).__name__}, "
                f"got values in [{arr.min():g}, {arr.max():g}]")


# ----------------------------------------------------------------------------------------------
# Discrete-time VP (DDPM betas), on the official DPM-Solver time convention.
# ----------------------------------------------------------------------------------------------

def betas_for_name(name: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> np.ndarray:
    """Betas as diffusers builds them for ``beta_schedule`` in {linear, scaled_linear, squaredcos_cap_v2}.

    diffusers computes ``linspace`` in float32; we do the same so that ``alphas_cumprod`` match it.
    "cosine" is iDDPM's squaredcos_cap_v2 (Nichol & Dhariwal 2021, eq. 17) with max_beta = 0.999.
    """
    if name not in BETA_SCHEDULE_NAMES:
        raise ValueError(f"beta schedule name must be one of {BETA_SCHEDULE_NAMES}, got {name!r}")
    if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
    n = int(num_train_timesteps)
    if name == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float32).astype(np.float64)
    if name == "scaled_linear":
        return (np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float32) ** 2).astype(np.float64)

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                    dtype=np.float32).astype(np.float64)


def _interp_extrapolate(x, xp, fp):
    """Piecewise-linear interpolation through (xp, fp) (xp increasing), extrapolating linearly outside.

    This is the official DPM-Solver ``interpolate_fn``: differentiable in x, defined everywhere.
    """
    xp = jnp.asarray(xp, x.dtype)
    fp = jnp.asarray(fp, x.dtype)
    idx = jnp.clip(jnp.searchsorted(xp, x, side="right") - 1, 0, xp.shape[0] - 2)
    x0, x1 = xp[idx], xp[idx + 1]
    f0, f1 = fp[idx], fp[idx + 1]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


@struct.dataclass
class DiscreteVP(_Schedule):
    """A DDPM schedule of N betas, made continuous as in the official DPM-Solver.

    Grid t_n = (n + 1) / N for n = 0..N-1 with log alpha_n = 1/2 sum_{i<=n} log(1 - beta_i);
    log alpha(t) is piecewise linear in t between grid points (DPM-Solver, App. D). A network trained
    on integer timesteps n is fed ``1000 * (t - 1/N)`` (see ``parameterization.discrete_time_model``).

    Fields:
      log_alpha_grid: [N] float64, log sqrt(alphas_cumprod).
    """

    log_alpha_grid: np.ndarray  # [N]

    @classmethod
    def from_betas(cls, betas) -> "DiscreteVP":
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"betas must be a 1-d array of at least 2 values, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must lie in (0, 1)")
        return cls(log_alpha_grid=0.5 * np.cumsum(np.log1p(-betas)))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "DiscreteVP":
        a = np.asarray(alphas_cumprod, dtype=np.float64)
        if a.ndim != 1 or a.shape[0] < 2 or not np.all((a > 0) & (a <= 1)) or np.any(np.diff(a) >= 0):
            raise ValueError("alphas_cumprod must be a strictly decreasing 1-d array in (0, 1]")
        return cls(log_alpha_grid=0.5 * np.log(a))

    @classmethod
    def from_name(cls, name: Literal["linear", "scaled_linear", "cosine"], num_train_timesteps: int = 1000,
                  beta_start: float = 1e-4, beta_end: float = 0.02) -> "DiscreteVP":
        """The schedule diffusers builds for ``beta_schedule=name`` ("cosine" = squaredcos_cap_v2)."""
        return cls.from_betas(betas_for_name(name, num_train_timesteps, beta_start, beta_end))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.log_alpha_grid.shape[0])

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.exp(2.0 * np.asarray(self.log_alpha_grid))

    @property
    def t_grid(self) -> np.ndarray:
        n = self.num_train_timesteps
        return np.arange(1, n + 1, dtype=np.float64) / n

    @property
    def t_min(self) -> float:
        return 1.0 / self.num_train_timesteps

    @property
    def t_max(self) -> float:
        return 1.0

    def log_alpha(self, t):
        """Piecewise linear through (t_n, log alpha_n), extrapolated linearly outside (``_interp_extrapolate``).

        The grid t_n = (n + 1)/N is uniform, so the interval is found by arithmetic (one floor and two gathers)
        rather than a search: every solver step evaluates the schedule several times, and a binary search
        compiles to a ``while`` loop inside the sampler's scan body.
        """
        t = _as_float(t)
        n = self.num_train_timesteps
        idx = jnp.clip(jnp.floor(t * n).astype(jnp.int32) - 1, 0, n - 2)
        fp = jnp.asarray(self.log_alpha_grid, t.dtype)
        t0 = (idx + 1).astype(t.dtype) / n
        return fp[idx] + (t - t0) * n * (fp[idx + 1] - fp[idx])

    def log_sigma(self, t):
        return _log_sigma_from_log_alpha(self.log_alpha(t))

    def t_of_lambda(self, lam):
        lam = _as_float(lam)
        log_alpha = _log_alpha_from_lambda_vp(lam)
        # log alpha decreases in t: interpolate t over the flipped (increasing) log-alpha grid.
        return _interp_extrapolate(log_alpha, jnp.flip(jnp.asarray(self.log_alpha_grid)), np.flip(self.t_grid))

    def timestep_of_t(self, t):
        """Continuous t -> the network's (float) timestep input, 1000 * (t - 1/N) as DPM-Solver's wrapper."""
        return 1000.0 * (_as_float(t) - 1.0 / self.num_train_timesteps)


# ----------------------------------------------------------------------------------------------
# Continuous VP schedules.
# ----------------------------------------------------------------------------------------------

@struct.dataclass
class LinearVP(_Schedule):
    """VP-SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021).

    log alpha_t = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2; t in [0, 1]; default end t = 1e-3.
    """

    beta_min: float = struct.field(pytree_node=False, default=0.1)
    beta_max: float = struct.field(pytree_node=False, default=20.0)

    t_max = 1.0
    t_min = 0.0

    def __post_init__(self):
        if not (0 <= self.beta_min < self.beta_max):
            raise ValueError(f"LinearVP needs 0 <= beta_min < beta_max, got {self.beta_min}, {self.beta_max}")

    @property
    def default_t_end(self) -> float:
        return 1e-3

    def log_alpha(self, t):
        t = _as_float(t)
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t):
        return _log_sigma_from_log_alpha(self.log_alpha(t))

    def t_of_lambda(self, lam):
        """Closed form (DPM-Solver code): u = log(1 + e^{-2 lambda}), t = 2 d u / (sqrt(b0^2 + 2 d u) + b0) / d."""
        lam = _as_float(lam)
        d = self.beta_max - self.beta_min
        u = jnp.logaddexp(jnp.zeros_like(lam), -2.0 * lam)
        return 2.0 * u / (jnp.sqrt(self.beta_min ** 2 + 2.0 * d * u) + self.beta_min)


@struct.dataclass
class CosineVP(_Schedule):
    """iDDPM cosine schedule in continuous time (Nichol & Dhariwal 2021, eq. 17), s = 0.008.

    log alpha_t = log cos((t + s)/(1 + s) pi/2) - log cos(s/(1 + s) pi/2); t_max = 0.9946 as in the official
    DPM-Solver (beyond it alpha underflows); default end t = 1e-3.
    """

    s: float = struct.field(pytree_node=False, default=0.008)
    t_max_value: float = struct.field(pytree_node=False, default=0.9946)

    t_min = 0.0

    @property
    def t_max(self) -> float:
        return self.t_max_value

    @property
    def default_t_end(self) -> float:
        return 1e-3

    # With x_0 = s/(1+s) pi/2 and d = t pi/(2(1+s)): alpha_t = cos(x_0 + d)/cos(x_0) = cos d - tan(x_0) sin d.
    # log alpha_t = log1p(-2 sin^2(d/2) - tan(x_0) sin d) keeps full relative precision near t = 0, where
    # log cos(x) - log cos(x_0) cancels (in float32 it left ~1e-3 relative error in 1 - alpha^2 at t = 1e-3,
    # and arccos near 1 gave t_of_lambda absolute errors ~1e-6 at t ~ 1e-5).

    def log_alpha(self, t):
        t = _as_float(t)
        d = t * (math.pi / (2.0 * (1.0 + self.s)))
        tan_0 = math.tan(self.s / (1.0 + self.s) * math.pi / 2.0)
        return jnp.log1p(-2.0 * jnp.sin(0.5 * d) ** 2 - tan_0 * jnp.sin(d))

    def log_sigma(self, t):
        return _log_sigma_from_log_alpha(self.log_alpha(t))

    def t_of_lambda(self, lam):
        """Solve cos d - tan(x_0) sin d = alpha for u = tan(d/2): (2 - m) u^2 + 2 tan(x_0) u - m = 0, m = 1 - alpha.

        The positive root is taken in the cancellation-free form u = m / (tan x_0 + sqrt(tan^2 x_0 + m (2 - m))).
        """
        lam = _as_float(lam)
        m = -jnp.expm1(_log_alpha_from_lambda_vp(lam))
        tan_0 = math.tan(self.s / (1.0 + self.s) * math.pi / 2.0)
        u = m / (tan_0 + jnp.sqrt(tan_0 ** 2 + m * (2.0 - m)))
        return 2.0 * jnp.arctan(u) * (2.0 * (1.0 + self.s) / math.pi)


@struct.dataclass
class FlowMatching(_Schedule):
    """Rectified flow / flow matching: x_t = (1 - t) x_0 + t eps (alpha = 1 - t, sigma = t).

    lambda = log((1 - t)/t), inverse t = sigmoid(-lambda). The valid range is [0, 1]; sampling defaults to
    [1e-3, 1 - 1e-3] so that noise-prediction solvers never divide by alpha = 0 (data-prediction solvers
    and ``final_sigma="zero"`` reach t = 0 exactly).
    """

    t_min = 0.0
    t_max = 1.0

    @property
    def default_t_start(self) -> float:
        return 1.0 - 1e-3

    @property
    def default_t_end(self) -> float:
        return 1e-3

    def log_alpha(self, t):
        return jnp.log1p(-_as_float(t))

    def log_sigma(self, t):
        return jnp.log(_as_float(t))

    def alpha(self, t):
        return 1.0 - _as_float(t)

    def sigma(self, t):
        return _as_float(t)

    def t_of_lambda(self, lam):
        return jax.nn.sigmoid(-_as_float(lam))


SCHEDULES = {"discrete": DiscreteVP, "linear": LinearVP, "cosine": CosineVP, "flow": FlowMatching}
SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "linear_vp", "cosine_vp", "flow")


def schedule_from_name(name: str, num_train_timesteps: int = 1000):
    """A schedule by config name: diffusers' discrete betas ("linear", "scaled_linear", "cosine") or the
    continuous "linear_vp", "cosine_vp", "flow"."""
    if name in BETA_SCHEDULE_NAMES:
        return DiscreteVP.from_name(name, num_train_timesteps)
    continuous = {"linear_vp": LinearVP, "cosine_vp": CosineVP, "flow": FlowMatching}
    if name not in continuous:
        raise ValueError(f"schedule name must be one of {SCHEDULE_NAMES}, got {name!r}")
    return continuous[name]()


def schedule_from_config(schedule_config):
    """The schedule of a config's ``schedule`` section: ``name`` + ``num_train_timesteps``, or exact ``betas``
    (folders written by ``dpmjax convert`` keep the diffusers checkpoint's betas)."""
    if schedule_config.get("betas") is not None:
        return DiscreteVP.from_betas(schedule_config["betas"])
    return schedule_from_name(schedule_config["name"], schedule_config.get("num_train_timesteps", 1000))


# ----------------------------------------------------------------------------------------------
# Time grids.
# ----------------------------------------------------------------------------------------------

SPACINGS = ("logSNR", "time_uniform", "time_quadratic", "karras", "linspace", "leading", "trailing")
DISCRETE_SPACINGS = ("linspace", "leading", "trailing")


def time_grid(schedule, num_steps: int, spacing: str = "time_uniform", *, t_start: float | None = None,
              t_end: float | None = None, rho: float = 7.0, steps_offset: int = 0) -> np.ndarray:
    """A decreasing grid of ``num_steps + 1`` times from t_start to t_end (both included), float64 numpy.

    Spacings (DPM-Solver ``get_time_steps``, Karras et al. 2022 eq. 5, diffusers ``timestep_spacing``):
      "logSNR":         lambda uniform between lambda(t_start) and lambda(t_end);
      "time_uniform":   t uniform;  "time_quadratic": sqrt(t) uniform (DDIM's quadratic);
      "karras":         sigma_ve = e^{-lambda} uniform in sigma_ve^{1/rho}, rho = 7;
      "linspace" / "leading" / "trailing": diffusers' integer timesteps k of a ``DiscreteVP``
          (k -> t = (k + 1)/N), exactly DPMSolverMultistepScheduler's ``timesteps`` (t_start/t_end are
          not used); the grid's last point is k = 0, where diffusers ends with final_sigmas_type="sigma_min".
    Computed on the host before anything is compiled.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    t_start = schedule.default_t_start if t_start is None else float(t_start)
    t_end = schedule.default_t_end if t_end is None else float(t_end)
    schedule.check_times(np.array([t_start, t_end]), name="t_start/t_end")
    if not t_start > t_end:
        raise ValueError(f"t_start must be greater than t_end, got t_start={t_start}, t_end={t_end}")

    if spacing in DISCRETE_SPACINGS:
        return _diffusers_grid(schedule, num_steps, spacing, steps_offset)

    if spacing == "time_uniform":
        grid = np.linspace(t_start, t_end, num_steps + 1)
    elif spacing == "time_quadratic":
        grid = np.linspace(np.sqrt(t_start), np.sqrt(t_end), num_steps + 1) ** 2
    else:
        lam_start, lam_end = _host_eval(_lambda_fn, schedule, np.array([t_start, t_end]))
        if spacing == "logSNR":
            lams = np.linspace(lam_start, lam_end, num_steps + 1)
        else:  # karras, in sigma_ve = e^{-lambda}
            s_max, s_min = np.exp(-lam_start), np.exp(-lam_end)
            ramp = np.linspace(0.0, 1.0, num_steps + 1)
            sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            lams = -np.log(sig)
        grid = _host_eval(_t_of_lambda_fn, schedule, lams)
    grid[0], grid[-1] = t_start, t_end  # exact endpoints (sqrt(t)^2 and t(lambda(t)) are off by ulps)
    return grid


@jax.jit
def _lambda_fn(schedule, t):
    return schedule.lambda_(t)


@jax.jit
def _t_of_lambda_fn(schedule, lam):
    return schedule.t_of_lambda(lam)


def lambda_on_host(schedule, t) -> np.ndarray:
    """lambda(t) as float64 numpy, computed outside any trace (safe to call while a sampler is being jitted)."""
    return _host_eval(_lambda_fn, schedule, np.atleast_1d(t))


def t_of_lambda_on_host(schedule, lam) -> np.ndarray:
    """t(lambda) as float64 numpy, computed outside any trace."""
    return _host_eval(_t_of_lambda_fn, schedule, np.atleast_1d(lam))


def _host_eval(fn, schedule, values) -> np.ndarray:
    """Evaluate a schedule function on the host in float64, outside any trace. Inputs are padded to a power
    of two so one compiled program serves every grid length (op-by-op evaluation compiled ~20 tiny programs
    per new length)."""
    values = np.asarray(values, np.float64)
    size = max(64, 1 << int(np.ceil(np.log2(len(values)))))
    padded = np.pad(values, (0, size - len(values)), mode="edge")
    with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]), jax.enable_x64(True):
        out = fn(float64_leaves(schedule), jnp.asarray(padded, jnp.float64))
        return np.array(out, dtype=np.float64)[: len(values)]


def float64_leaves(schedule):
    """The schedule with every array leaf an explicit float64 device array (call inside ``jax.enable_x64``).

    A numpy leaf handed to a jitted function is converted by the x64 state of the moment; inside an outer
    trace that state can differ from the one the cached executable was compiled under (the executable then
    refuses an f32 buffer for its f64 parameter), so host-side evaluations convert explicitly.
    """
    return jax.tree.map(lambda leaf: jnp.asarray(np.asarray(leaf, np.float64), jnp.float64), schedule)


def _diffusers_grid(schedule, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"spacing {spacing!r} needs a DiscreteVP schedule, got {type(schedule).__name__}")
    n = schedule.num_train_timesteps
    if num_steps > n:
        raise ValueError(f"num_steps must be <= num_train_timesteps={n} for spacing {spacing!r}")
    if spacing == "linspace":
        ks = np.linspace(0, n - 1, num_steps + 1).round()[::-1]
    else:
        # diffusers' num_steps timesteps, then the end point k = 0 (the "sigma_min" final step).
        if spacing == "leading":
            # As DPMSolverMultistepScheduler (and UniPC/DEIS): ratio N // (num_steps + 1), num_steps + 1
            # points with k = 0 dropped. (DDIMScheduler's leading uses N // num_steps and keeps k = 0.)
            ratio = n // (num_steps + 1)
            ks = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + steps_offset
        else:  # trailing
            ks = np.round(np.arange(n, 0, -n / num_steps)) - 1
        if ks[-1] <= 0:
            raise ValueError(f"{num_steps} steps with spacing {spacing!r} already end at timestep 0 on a "
                             f"{n}-step schedule; use fewer steps or spacing 'linspace'")
        ks = np.append(ks, 0.0)
    ks = np.asarray(ks, dtype=np.float64)
    if np.any(np.diff(ks) >= 0):
        raise ValueError(f"{num_steps} steps with spacing {spacing!r} give repeated timesteps on a "
                         f"{n}-step schedule; use fewer steps or another spacing")
    return (ks + 1.0) / n


def validate_timesteps(schedule, timesteps, *, min_points: int = 2, name: str = "timesteps") -> np.ndarray | jax.Array:
    """Check an explicit grid: shape [N+1] or [N+1, B], strictly decreasing, inside the schedule's range."""
    if isinstance(timesteps, jax.core.Tracer):
        return timesteps
    arr = np.asarray(timesteps, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape [N+1] or [N+1, batch], got {arr.shape}")
    if arr.shape[0] < min_points:
        raise ValueError(f"{name} needs at least {min_points} points (start and end), got {arr.shape[0]}")
    if not np.all(np.diff(arr, axis=0) < 0):
        raise ValueError(f"{name} must be strictly decreasing (from noise to data), got {arr.tolist()}")
    schedule.check_times(arr, name=name)
    return arr
