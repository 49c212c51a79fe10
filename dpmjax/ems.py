"""Empirical model statistics (EMS) of DPM-Solver-v3: l, s, b on a logSNR-uniform grid, computed from data.

DPM-Solver-v3 (Zheng, Lu, Chen, Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics") writes the diffusion ODE in lambda = log(alpha/sigma) with three element-wise coefficients:

    dx/dlambda = (alpha'/alpha - l) x - alpha f,      f = (sigma eps - l x) / alpha           (eq. 4, 6)
    l*  = argmin E ||grad_x (sigma eps - l x)||_F^2 = E[diag(sigma grad_x eps)]                     (eq. 5, 58)
    s*, b* = argmin E ||f^(1) - s f - b||^2:  s* = Cov(f, f^(1)) / Var(f),  b* = E f^(1) - s* E f     (eq. 11, 60-61)
    f^(1) = df/dlambda along the ODE = e^{-lambda} ((l - 1) eps + eps^(1)) - l' x / alpha           (eq. 62)
    eps^(1) = d eps/dlambda + grad_x eps . dx/dlambda,  dx/dlambda = (alpha'/alpha) x - sigma eps    (eq. 63)

The expectations are over x_lambda from the forward diffusion of data samples x_0 (App. D: "we draw datapoints
x_lambda from the marginal q_lambda defined by the forward diffusion process starting from some data
distribution q_0"); for an exact model (``dpmjax.oracle``) that is the ODE marginal itself. diag(grad_x eps) is
estimated without Jacobians by Rademacher probes, diag(J) ~ (J v) * v (eq. 57-58), one forward-mode JVP each;
eps^(1) is one more JVP along (dx/dlambda, dt/dlambda); l' is a finite difference of l over the grid (App. C.1.1).
Two passes over the grid: l first (it enters f and f^(1)), then the moments of f and f^(1). Every grid point uses
the same data, forward noise and probes (common random numbers: the Monte Carlo error is smooth in lambda, so
l' and the solver's Taylor expansions of g are not spoiled by point-to-point noise), l' uses fourth-order
differences, and l - 1 is accumulated instead of l (float32 sums would quantise l ~ 1 at high noise, where
l' x / alpha is large).

Storage: one ``.npz`` with l, s, b ([N+1, *data_shape], float64), the grid (lambda, t, log alpha, log sigma) and
metadata (schedule description, t range, N, K, model identity string). ``load_ems`` checks schedule, range and
grid size when asked; the sampler (``solver="dpm_solver_v3", ems=ems``) always checks the schedule and range.
``EMS.from_official`` reads the official ``l.npz`` / ``sb.npz`` directories.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax import parameterization
from dpmjax.schedules import float64_leaves
from dpmjax.sharding import data_sharding, make_mesh

__all__ = ["EMS", "compute_ems", "load_ems", "describe_schedule", "ems_grid", "schedule_at", "lambda_derivative"]

FORMAT_VERSION = 1


def describe_schedule(schedule) -> str:
    """A short identity string: class name and fields (array fields by their SHA-1)."""
    parts = []
    for field in dataclasses.fields(schedule):
        value = getattr(schedule, field.name)
        if isinstance(value, (np.ndarray, jax.Array)):
            digest = hashlib.sha1(np.ascontiguousarray(np.asarray(value, np.float64)).tobytes()).hexdigest()
            parts.append(f"{field.name}=<{np.shape(value)} sha1:{digest[:12]}>")
        else:
            parts.append(f"{field.name}={value!r}")
    return f"{type(schedule).__name__}({', '.join(parts)})"


@jax.jit
def _schedule_at_jit(schedule, t):
    return schedule.lambda_(t), schedule.log_alpha(t), schedule.log_sigma(t)


def schedule_at(schedule, t):
    """(lambda, log alpha, log sigma) of ``schedule`` at host times ``t``, float64 numpy.

    One jitted call with the schedule as a pytree argument: compiled once per schedule type and shape (evaluating
    the schedule op by op on the host compiles every primitive separately, seconds per call).
    """
    with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]), jax.enable_x64(True):
        out = _schedule_at_jit(float64_leaves(schedule), jnp.asarray(np.asarray(t, np.float64), jnp.float64))
        return tuple(np.array(a, np.float64) for a in out)


def ems_grid(schedule, t_start: float, t_end: float, num_grid: int, *, derivatives: bool = False):
    """The EMS grid: lambda uniform from lambda(t_start) to lambda(t_end), N + 1 points, with t, log alpha,
    log sigma there (float64 numpy; the end times are kept exact). With ``derivatives`` also
    d log alpha / d lambda and dt / d lambda (by autodiff of the schedule in t)."""
    if not isinstance(num_grid, (int, np.integer)) or isinstance(num_grid, bool) or num_grid < 1:
        raise ValueError(f"num_grid must be a positive integer, got {num_grid!r}")
    t_start, t_end = float(t_start), float(t_end)
    schedule.check_times(np.array([t_start, t_end]), name="t_start/t_end")
    if not t_start > t_end:
        raise ValueError(f"t_start must be greater than t_end, got t_start={t_start}, t_end={t_end}")

    key = describe_schedule(schedule)
    grid = _GRID_FNS.get(key)
    if grid is None:
        grid = _GRID_FNS[key] = jax.jit(functools.partial(_grid_fn, schedule))
    ramp = np.linspace(0.0, 1.0, int(num_grid) + 1)
    with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]), jax.enable_x64(True):
        out = grid(jnp.asarray([t_start, t_end], jnp.float64), jnp.asarray(ramp, jnp.float64))
        out = tuple(np.array(a, np.float64) for a in out)
    return out if derivatives else out[:4]


_GRID_FNS: dict = {}  # schedule description -> jitted _grid_fn (t_of_lambda may not take a traced schedule)


def _grid_fn(schedule, ends, ramp):
    lam_ends = schedule.lambda_(ends)
    lam = lam_ends[0] + ramp * (lam_ends[1] - lam_ends[0])
    t = schedule.t_of_lambda(lam).at[0].set(ends[0]).at[-1].set(ends[1])
    dlog_alpha_dt = jax.vmap(jax.grad(schedule.log_alpha))(t)
    dt_dlam = 1.0 / jax.vmap(jax.grad(schedule.lambda_))(t)
    return lam, t, schedule.log_alpha(t), schedule.log_sigma(t), dlog_alpha_dt * dt_dlam, dt_dlam


@dataclasses.dataclass(frozen=True, eq=False)
class EMS:
    """Empirical model statistics on a lambda-uniform grid from t_start (index 0) to t_end (index N).

    Fields:
      l, s, b:         [N+1, *data_shape] float64 (element-wise statistics, official layout)
      lambda_grid:     [N+1] increasing half-logSNR;  t_grid: [N+1] decreasing times (t_grid[0] = t_start)
      log_alpha_grid, log_sigma_grid: [N+1] the schedule at t_grid (checked against the sampling schedule)
      num_samples:     K, the number of data points the statistics were estimated from (0: not estimated)
      schedule_desc:   ``describe_schedule`` of the schedule;  model_id: free-form model identity string
      info:            other metadata (probes, prediction, seconds, ...), JSON-serialisable
    """

    l: np.ndarray
    s: np.ndarray
    b: np.ndarray
    lambda_grid: np.ndarray
    t_grid: np.ndarray
    log_alpha_grid: np.ndarray
    log_sigma_grid: np.ndarray
    num_samples: int = 0
    schedule_desc: str = ""
    model_id: str = ""
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("l", "s", "b", "lambda_grid", "t_grid", "log_alpha_grid", "log_sigma_grid"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), np.float64))
        n1 = self.lambda_grid.shape[0]
        if self.lambda_grid.ndim != 1 or n1 < 2:
            raise ValueError(f"EMS lambda_grid must be 1-d with at least 2 points, got {self.lambda_grid.shape}")
        for name in ("t_grid", "log_alpha_grid", "log_sigma_grid"):
            if getattr(self, name).shape != (n1,):
                raise ValueError(f"EMS {name} must have shape ({n1},), got {getattr(self, name).shape}")
        for name in ("l", "s", "b"):
            arr = getattr(self, name)
            if arr.ndim < 1 or arr.shape[0] != n1 or arr.shape != self.l.shape:
                raise ValueError(f"EMS statistic {name} must have shape [N+1={n1}, *data_shape] like l "
                                 f"{self.l.shape}, got {arr.shape}")
        for name in ("l", "s", "b", "lambda_grid", "t_grid", "log_alpha_grid", "log_sigma_grid"):
            arr = getattr(self, name)
            bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
            if bad.any():
                where = np.flatnonzero(bad)
                raise ValueError(
                    f"EMS statistic {name} is not finite at {where.size} of {n1} grid points (first at index "
                    f"{where[0]}, t={self.t_grid[where[0]]:.6g}); the model or the data gave NaN/inf "
                    "(e.g. a degenerate model with Var(f) = 0); recompute the statistics")
        object.__setattr__(self, "_checked", set())  # schedule descriptions that passed check_schedule
        steps = np.diff(self.lambda_grid)
        span = self.lambda_grid[-1] - self.lambda_grid[0]
        if not np.all(steps > 0) or np.max(np.abs(steps - span / (n1 - 1))) > 1e-6 * max(1.0, abs(span)):
            raise ValueError("EMS lambda_grid must be increasing and uniform in lambda (t_start -> t_end)")

    # -- properties --------------------------------------------------------------------------------

    @property
    def num_grid(self) -> int:
        """N: the number of grid intervals (N + 1 points), the official ``statistics_steps``."""
        return int(self.lambda_grid.shape[0] - 1)

    @property
    def shape(self) -> tuple:
        return tuple(self.l.shape[1:])

    @property
    def t_start(self) -> float:
        return float(self.t_grid[0])

    @property
    def t_end(self) -> float:
        return float(self.t_grid[-1])

    def __repr__(self):
        return (f"EMS(shape={self.shape}, N={self.num_grid}, K={self.num_samples}, t=[{self.t_start:g}, "
                f"{self.t_end:g}], schedule={self.schedule_desc!r}, model_id={self.model_id!r})")

    # -- checks --------------------------------------------------------------------------------------

    def check_schedule(self, schedule) -> None:
        """Raise ``ValueError`` unless ``schedule`` has the same lambda and alpha on the grid as the EMS's."""
        desc = describe_schedule(schedule)
        if desc in self._checked:
            return
        lam, log_alpha, _ = schedule_at(schedule, self.t_grid)
        err = max(np.max(np.abs(lam - self.lambda_grid) / (1.0 + np.abs(self.lambda_grid))),
                  np.max(np.abs(log_alpha - self.log_alpha_grid) / (1.0 + np.abs(self.log_alpha_grid))))
        if not np.isfinite(err) or err > 1e-5:
            raise ValueError(
                f"ems was computed for another schedule: {self.schedule_desc or '(unknown)'}; sampling uses "
                f"{describe_schedule(schedule)} (lambda/log-alpha on the EMS grid differ by {err:.3g}). "
                "Compute the statistics for this schedule (dpmjax.ems.compute_ems).")
        self._checked.add(desc)

    def check_range(self, t_start: float, t_end: float) -> None:
        """Raise ``ValueError`` unless [t_end, t_start] lies within the EMS range (relative slack 1e-6)."""
        if t_start > self.t_start * (1 + 1e-6) or t_end < self.t_end * (1 - 1e-6):
            raise ValueError(f"sampling range [t_end={t_end:g}, t_start={t_start:g}] is outside the EMS range "
                             f"[{self.t_end:g}, {self.t_start:g}]; compute the statistics over the sampling "
                             "range (dpmjax.ems.compute_ems(..., t_start=, t_end=))")

    # -- construction / io --------------------------------------------------------------------------

    @classmethod
    def degenerate(cls, schedule, *, t_start: float, t_end: float, num_grid: int, shape=()) -> "EMS":
        """l = 1, s = b = 0: DPM-Solver-v3 then is DPM-Solver++ in its Taylor form (official ``degenerated``)."""
        lam, t, la, ls = ems_grid(schedule, t_start, t_end, num_grid)
        full = (lam.shape[0],) + tuple(shape)
        return cls(np.ones(full), np.zeros(full), np.zeros(full), lam, t, la, ls, num_samples=0,
                   schedule_desc=describe_schedule(schedule), model_id="degenerate", info={"degenerate": True})

    @classmethod
    def from_official(cls, statistics_dir: str, schedule, *, t_start: float, t_end: float,
                      model_id: str = "") -> "EMS":
        """Read the official format (``l.npz`` key "l", ``sb.npz`` keys "s", "b"; [N+1, C, H, W]).

        The official files carry no metadata: the schedule and the range (encoded in the directory name, e.g.
        ``0.001_1200_4096`` = t_end, N, K) must be given. Data layout is kept as stored (channels first).
        """
        import os

        l = np.load(os.path.join(statistics_dir, "l.npz"))["l"]
        sb = np.load(os.path.join(statistics_dir, "sb.npz"))
        lam, t, la, ls = ems_grid(schedule, t_start, t_end, l.shape[0] - 1)
        return cls(l, sb["s"], sb["b"], lam, t, la, ls, num_samples=0, schedule_desc=describe_schedule(schedule),
                   model_id=model_id or f"official:{statistics_dir}", info={"source": "official"})

    def save(self, path: str) -> None:
        meta = {"format_version": FORMAT_VERSION, "num_samples": int(self.num_samples),
                "schedule_desc": self.schedule_desc, "model_id": self.model_id, "info": self.info,
                "t_start": self.t_start, "t_end": self.t_end, "num_grid": self.num_grid}
        with open(path, "wb") as f:
            np.savez(f, l=self.l, s=self.s, b=self.b, lambda_grid=self.lambda_grid, t_grid=self.t_grid,
                     log_alpha_grid=self.log_alpha_grid, log_sigma_grid=self.log_sigma_grid,
                     meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: str) -> "EMS":
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported EMS format version {meta.get('format_version')!r}")
            return cls(data["l"], data["s"], data["b"], data["lambda_grid"], data["t_grid"],
                       data["log_alpha_grid"], data["log_sigma_grid"], num_samples=meta["num_samples"],
                       schedule_desc=meta["schedule_desc"], model_id=meta["model_id"], info=meta["info"])


def load_ems(path: str, *, schedule=None, t_start: float | None = None, t_end: float | None = None,
             num_grid: int | None = None, model_id: str | None = None) -> EMS:
    """Load statistics saved by ``EMS.save`` and check them against what they will be used with.

    Args:
      schedule: check that the statistics were computed on this schedule (lambda and alpha on the grid).
      t_start, t_end: check that the EMS range covers this sampling range.
      num_grid: check the grid size N.
      model_id: check the model identity string.
    Raises:
      ValueError on any mismatch or non-finite statistic.
    """
    ems = EMS.load(path)
    if schedule is not None:
        ems.check_schedule(schedule)
    if t_start is not None or t_end is not None:
        ems.check_range(ems.t_start if t_start is None else float(t_start),
                        ems.t_end if t_end is None else float(t_end))
    if num_grid is not None and int(num_grid) != ems.num_grid:
        raise ValueError(f"{path}: EMS grid has N={ems.num_grid} intervals, expected num_grid={num_grid}")
    if model_id is not None and model_id != ems.model_id:
        raise ValueError(f"{path}: EMS is for model {ems.model_id!r}, expected {model_id!r}")
    return ems


# ---------------------------------------------------------------------------------------------------
# Estimation.
# ---------------------------------------------------------------------------------------------------

def _merge(acc, count, mean_b, m2_b, c2_b, n_b):
    """Chan et al. parallel update of (n, mean_f, mean_f1, M2(f), C(f, f1)) with one batch, in float64."""
    if acc is None:
        return [mean_b[0], mean_b[1], m2_b, c2_b], n_b
    mean_f, mean_f1, m2, c2 = acc
    n = count + n_b
    d_f, d_f1 = mean_b[0] - mean_f, mean_b[1] - mean_f1
    w = count * n_b / n
    return [mean_f + d_f * n_b / n, mean_f1 + d_f1 * n_b / n, m2 + m2_b + d_f * d_f * w,
            c2 + c2_b + d_f * d_f1 * w], n


# The two jitted kernels, with the model a static argument: repeated calls with the same ``model_fn`` object
# (and shapes) reuse the compiled code. ``coef`` = (alpha, sigma, e^{-lambda}, dlog alpha/dlambda, dt/dlambda).

def _eps(model_fn, schedule, prediction, x, t):
    t_vec = jnp.broadcast_to(t, x.shape[:1]).astype(x.dtype)
    out = jnp.asarray(model_fn(x, t_vec)).astype(x.dtype)
    return parameterization.to_eps(out, x, t_vec, schedule, prediction)


def _noised(x0, key, coef):
    return coef[0] * x0 + coef[1] * jax.random.normal(jax.random.fold_in(key, 0), x0.shape, x0.dtype)


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction", "num_probes"))
def _l_batch(x0, key, coef, t, schedule, *, model_fn, prediction, num_probes):
    """sum over the batch and probes of (sigma J v - v) * v = sigma (J v) * v - 1, J = grad_x eps (eq. 58).

    l is close to 1 at high noise and its lambda-derivative enters f^(1) multiplied by 1/alpha: summing l - 1
    (not l) keeps float32 sums from quantising it (the host adds the 1 back in float64).
    """
    x = _noised(x0, key, coef)
    probes = jax.random.rademacher(jax.random.fold_in(key, 1), (num_probes,) + x.shape, x.dtype)
    eps_x = lambda y: _eps(model_fn, schedule, prediction, y, t)
    jv = jax.vmap(lambda v: jax.jvp(eps_x, (x,), (v,))[1])(probes)
    return jnp.sum((coef[1] * jv - probes) * probes, axis=(0, 1)) / num_probes


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction"))
def _f_batch(x0, key, coef, t, l, dl, schedule, *, model_fn, prediction):
    """Batch means of f and f^(1) and their centred sums of squares/products (eq. 60-62)."""
    alpha, sigma, e_minus_lam, dla, dtl = coef[0], coef[1], coef[2], coef[3], coef[4]
    x = _noised(x0, key, coef)
    eps_fn = lambda y, tt: _eps(model_fn, schedule, prediction, y, tt)
    eps = eps_fn(x, t)
    dx = dla * x - sigma * eps                          # dx/dlambda along the ODE
    _, eps1 = jax.jvp(eps_fn, (x, t), (dx, dtl))        # eps^(1), eq. 63
    f = e_minus_lam * eps - l * x / alpha
    f1 = e_minus_lam * ((l - 1.0) * eps + eps1) - dl * x / alpha
    mf, mf1 = jnp.mean(f, 0), jnp.mean(f1, 0)
    return jnp.stack([mf, mf1]), jnp.sum((f - mf) ** 2, 0), jnp.sum((f - mf) * (f1 - mf1), 0)


def lambda_derivative(values, lam) -> np.ndarray:
    """d values / d lambda on the uniform grid by fourth-order finite differences (one-sided at the ends).

    l' enters f^(1) as l' x / alpha: at high noise 1/alpha ~ 1e2 and 1 - l ~ alpha^2, so the O(dlam^2) error of
    second-order differences (about 1% of l' at dlam = 0.1) is as large as the fluctuation of f^(1) that
    s is fitted to; fourth order makes it negligible at N >= 100 on typical ranges.
    """
    values = np.asarray(values, np.float64)
    n1 = values.shape[0]
    if n1 < 5:
        return np.gradient(values, lam, axis=0, edge_order=2 if n1 > 2 else 1)
    h = (lam[-1] - lam[0]) / (n1 - 1)
    out = np.empty_like(values)
    out[2:-2] = (values[:-4] - 8 * values[1:-3] + 8 * values[3:-1] - values[4:]) / (12 * h)
    first = np.array([[-25, 48, -36, 16, -3], [-3, -10, 18, -6, 1]], np.float64) / (12 * h)
    head, tail = values[:5], values[-5:]
    out[0] = np.tensordot(first[0], head, 1)
    out[1] = np.tensordot(first[1], head, 1)
    out[-1] = -np.tensordot(first[0], tail[::-1], 1)
    out[-2] = -np.tensordot(first[1], tail[::-1], 1)
    return out


def compute_ems(model_fn: Callable, schedule, data, *, t_start: float | None = None, t_end: float | None = None,
                num_grid: int = 200, prediction: str = "eps", num_probes: int = 1, batch_size: int = 256,
                key=None, model_id: str = "", progress: bool = True, shard: bool | None = None) -> EMS:
    """Estimate the EMS l, s, b of ``model_fn`` on N + 1 lambda-uniform points from K data samples.

    Args:
      model_fn: ``model_fn(x [B, ...], t [B]) -> prediction`` (as for ``dpmjax.sample``).
      schedule: the model's schedule; t_start/t_end: the sampling range (default: the schedule's).
      data: [K, *data_shape] samples of the data distribution q_0 (the paper uses the training set).
      num_grid: N (the paper: 120-1200). Sampling needs N well above the number of steps (times are snapped).
      prediction: what ``model_fn`` returns ("eps", "x0", "v", "score", "flow").
      num_probes: Rademacher probes per data point for diag(grad_x eps) (1 = the paper's estimator).
      batch_size: data points per jitted call; sharded over the data axis across all devices when
        ``shard`` (default: when more than one device and the batch divides evenly).
      key: ``jax.random.key`` for the forward noise and the probes (default key 0).
      model_id: stored with the statistics (e.g. the checkpoint path and step).
      progress: show a tqdm progress bar over the 2 (N + 1) grid passes.
    Returns:
      ``EMS`` (save with ``.save(path)``); ``info["seconds"]`` holds the wall time.
    """
    parameterization.check_prediction(prediction)
    data = np.asarray(data)
    if data.ndim < 2 or data.shape[0] < 2 or not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"data must be a float array [K >= 2, *data_shape], got {data.dtype} {data.shape}")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    t_start = schedule.default_t_start if t_start is None else float(t_start)
    t_end = schedule.default_t_end if t_end is None else float(t_end)
    lam, t_grid, log_alpha, log_sigma, dlog_alpha_dlam, dt_dlam = ems_grid(schedule, t_start, t_end, num_grid,
                                                                           derivatives=True)
    key = jax.random.key(0) if key is None else key
    dtype = jax.dtypes.canonicalize_dtype(data.dtype)  # float64 data stays float64 only under x64
    num, shape = data.shape[0], data.shape[1:]
    batches = [(lo, min(lo + batch_size, num)) for lo in range(0, num, batch_size)]
    devices = jax.devices()
    mesh = make_mesh() if len(devices) > 1 else None

    def put(x0):
        use = (mesh is not None) if shard is None else bool(shard and mesh is not None)
        if use and x0.shape[0] % len(devices) == 0:
            return jax.device_put(x0, data_sharding(mesh))
        return jnp.asarray(x0)

    l_batch = functools.partial(_l_batch, model_fn=model_fn, prediction=prediction, num_probes=num_probes)
    f_batch = functools.partial(_f_batch, model_fn=model_fn, prediction=prediction)

    from tqdm import tqdm  # not tqdm.auto: a Jupyter kernel without ipywidgets warns even when disabled

    n1 = lam.shape[0]
    start = time.perf_counter()
    bar = tqdm(total=2 * n1, desc="EMS", disable=not progress)
    coefs = [np.array([math.exp(log_alpha[j]), math.exp(log_sigma[j]), math.exp(-lam[j]), dlog_alpha_dlam[j],
                       dt_dlam[j]]) for j in range(n1)]
    chunks = [put(data[lo:hi].astype(dtype)) for lo, hi in batches]
    # Common random numbers: every grid point sees the same data, forward noise and probes. Each estimate stays
    # unbiased, and its Monte Carlo error becomes a smooth function of lambda -- what matters for l' (a finite
    # difference) and for the solver, whose discretization error depends on how smooth g (and so s, b) is.
    batch_keys = [jax.random.fold_in(key, c) for c in range(len(chunks))]
    l_sum = np.zeros((n1,) + shape)
    for j in range(n1):
        coef, t = jnp.asarray(coefs[j], dtype), jnp.asarray(t_grid[j], dtype)
        for c, x0 in enumerate(chunks):
            l_sum[j] += np.asarray(l_batch(x0, batch_keys[c], coef, t, schedule), np.float64)
        bar.update()
    l_stat = 1.0 + l_sum / num
    dl_stat = lambda_derivative(l_stat, lam)
    s_stat, b_stat = np.zeros_like(l_stat), np.zeros_like(l_stat)
    for j in range(n1):
        coef, t = jnp.asarray(coefs[j], dtype), jnp.asarray(t_grid[j], dtype)
        lj, dlj = jnp.asarray(l_stat[j], dtype), jnp.asarray(dl_stat[j], dtype)
        acc, count = None, 0
        for c, x0 in enumerate(chunks):
            means, m2, c2 = (np.asarray(a, np.float64) for a in
                             f_batch(x0, batch_keys[c], coef, t, lj, dlj, schedule))
            acc, count = _merge(acc, count, means, m2, c2, x0.shape[0])
        mean_f, mean_f1, m2, c2 = acc
        # s = Cov(f, f1) / Var(f); where f does not vary at all the slope is undetermined: s = 0, b = E f1.
        s_stat[j] = np.where(m2 > 0, c2 / np.where(m2 > 0, m2, 1.0), 0.0)
        b_stat[j] = mean_f1 - s_stat[j] * mean_f
        bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    info = {"num_probes": num_probes, "prediction": prediction, "seconds": seconds, "batch_size": batch_size,
            "devices": len(devices), "method": "forward-noised data, common random numbers over the grid; "
            "Rademacher JVP diagonal estimator; 4th-order finite differences for dl/dlambda"}
    return EMS(l_stat, s_stat, b_stat, lam, t_grid, log_alpha, log_sigma, num_samples=num,
               schedule_desc=describe_schedule(schedule), model_id=model_id, info=info)
