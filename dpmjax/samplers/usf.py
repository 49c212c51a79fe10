"""USF: the unified sampling framework (Liu et al., ICLR 2024, "A Unified Sampling Framework for Solver
Searching of Diffusion Probabilistic Models"): a solver is a per-step *schedule spec*, run by one generic scan.

Step i goes from s = t_i to t = t_{i+1} (h = lambda_t - lambda_s) with the exponential-integrator Taylor
expansion of the chosen prediction m (data: hh = -h, c = alpha_t, ratio = sigma_t/sigma_s; noise: hh = h,
c = sigma_t, ratio = alpha_t/alpha_s), the derivatives estimated from the history m_k at r_k = (lambda_k -
lambda_s)/h:

    x_t = ratio x_s - c (e^{hh} - 1) m_0 - c sum_k w_k D_k,    D_k = (m_k - m_0)/r_k,
    w = Lagrange weights of the nodes r_1..r_d for the moments (g_1, .., g_{p-1}, 0, .., 0),
    g_j = j! h phi_{j+1}(hh)    (UniPC's notation; the same weights as ``unipc._lagrange_weights``).

Per step the spec chooses: the time point t_{i+1}; the prediction type (noise/data); the Taylor order p (1-3:
terms kept); the derivative-estimation order d (1-2 history points, d >= p - 1: with d > p - 1 the
interpolant's higher terms are estimated but truncated); the relaxation of the first-derivative coefficient
g_1 when a single node determines it: "none" (exact Taylor, h phi_2), "bh1" (hh/2, UniPC-bh1), "bh2"
((e^{hh} - 1)/2, DPM-Solver-2 / UniPC-bh2) or "linear" (g_1 (1 + c h), c searched); the corrector
(UniC-p with the nodes r_1..r_{p-1}, 1 and the model call at the predicted x~_t that the next step needs
anyway, as UniPC); and for the whole run the analytic first step (AFS: x0 = 0 at t_0, i.e. eps = x_T/sigma,
saving one model call). Known solvers are specs: ``known_spec("dpmpp_2m" | "unipc" | "ddim", ...)`` equals
their dedicated implementations to rounding (tests/test_usf.py).
Not implemented from the paper: the "dpmsolver_v3" prediction type, implicit correctors, skip coefficients.
"""
from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.samplers.base import ModelEval, Solver, at_time, combine_lags, expand_like, ring_slot
from dpmjax.samplers.dpm_solver import multistep_order
from dpmjax.samplers.unipc import _lagrange_weights, h_phis, step_points, unipc_order
from dpmjax.schedules import time_grid

RELAXATIONS = ("none", "bh1", "bh2", "linear")
HISTORY = 3


@dataclasses.dataclass(frozen=True)
class USFSpec:
    """A solver schedule: per step i = 0..N-1 (tuples of length N; ``timesteps`` has N + 1 points)."""

    timesteps: tuple
    data: tuple          # True: data (x0) prediction, False: noise prediction
    order: tuple         # Taylor order p in 1..3
    deriv_order: tuple   # history points d in 1..2 for the derivatives (d >= p - 1)
    relax: tuple         # one of RELAXATIONS
    relax_c: tuple       # c of the "linear" relaxation
    corrector: tuple     # correct this step's result with the next model call (ignored on the last step)
    afs: bool = False    # analytic first step (x0 = 0 at t_0): one model call fewer

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    @property
    def nfe(self) -> int:
        return self.num_steps - int(self.afs)

    def validate(self) -> "USFSpec":
        n = self.num_steps
        if n < 1:
            raise ValueError("usf spec: timesteps needs at least 2 points")
        for field in ("data", "order", "deriv_order", "relax", "relax_c", "corrector"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"usf spec: {field} must have one entry per step ({n}), got "
                                 f"{len(getattr(self, field))}")
        ts = np.asarray(self.timesteps, np.float64)
        if not np.all(np.diff(ts) < 0):
            raise ValueError("usf spec: timesteps must be strictly decreasing")
        for i, (p, d, r) in enumerate(zip(self.order, self.deriv_order, self.relax)):
            if p not in (1, 2, 3) or d not in (1, 2) or d < p - 1:
                raise ValueError(f"usf spec step {i}: order must be 1-3 and deriv_order 1-2 with deriv_order >= "
                                 f"order - 1, got order={p}, deriv_order={d}")
            if p > i + 1:
                raise ValueError(f"usf spec step {i}: order {p} needs {p - 1} earlier outputs, only {i} exist")
            if d > max(i, 1) and p > 1:
                raise ValueError(f"usf spec step {i}: deriv_order {d} needs {d} earlier outputs, only {i} exist")
            if r not in RELAXATIONS:
                raise ValueError(f"usf spec step {i}: relax must be one of {RELAXATIONS}, got {r!r}")
        return self

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "timesteps": [float(t) for t in self.timesteps],
                "relax_c": [float(c) for c in self.relax_c], "data": [bool(v) for v in self.data],
                "corrector": [bool(v) for v in self.corrector], "order": [int(v) for v in self.order],
                "deriv_order": [int(v) for v in self.deriv_order]}

    @classmethod
    def from_json(cls, d: dict) -> "USFSpec":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}).validate()

    def dumps(self) -> str:
        return json.dumps(self.to_json())


def known_spec(solver: str, schedule, nfe: int, *, spacing: str = "time_uniform", order: int = 2,
               variant: str = "bh2", lower_order_final: bool = True, timesteps=None) -> USFSpec:
    """The spec of a hand-made solver: "ddim", "dpmpp_2m", "dpm_solver_2m" or "unipc" (order 1-3, variant)."""
    n = nfe
    ts = np.asarray(time_grid(schedule, n, spacing) if timesteps is None else timesteps, np.float64)
    i = np.arange(n)
    if solver == "ddim":
        p, relax, corr, data = np.ones(n, int), ["none"] * n, [False] * n, True
    elif solver in ("dpmpp_2m", "dpm_solver_2m"):
        p = np.asarray([int(multistep_order(k, 2, n, lower_order_final)) for k in i])
        relax, corr, data = ["bh2"] * n, [False] * n, solver == "dpmpp_2m"
    elif solver == "unipc":
        p = np.asarray([int(unipc_order(k, order, n, lower_order_final)) for k in i])
        relax, corr, data = [variant] * n, [True] * n, True
    else:
        raise ValueError(f"known_spec: solver must be 'ddim', 'dpmpp_2m', 'dpm_solver_2m' or 'unipc', got {solver!r}")
    return USFSpec(timesteps=tuple(float(t) for t in ts), data=(data,) * n, order=tuple(int(v) for v in p),
                   deriv_order=tuple(max(int(v) - 1, 1) for v in p), relax=tuple(relax), relax_c=(0.0,) * n,
                   corrector=tuple(corr)).validate()


SPEC_FIELDS = ("data", "order", "deriv_order", "relax", "relax_c", "corrector")


def spec_arrays(spec: USFSpec) -> dict:
    """The per-step fields as host arrays (what the scan indexes as grid data; traced for a batched search)."""
    return {"data": np.asarray(spec.data, bool), "order": np.asarray(spec.order, np.int32),
            "deriv_order": np.asarray(spec.deriv_order, np.int32),
            "relax": np.asarray([RELAXATIONS.index(r) for r in spec.relax], np.int32),
            "relax_c": np.asarray(spec.relax_c, np.float64), "corrector": np.asarray(spec.corrector, bool)}


def usf_weights(lambdas, s, t, p, d, relax, relax_c, *, data, avail, corrector: bool = False):
    """(ratio, w [HISTORY(, B)], w_t): one generic step as x_t = ratio x_s + sum_k w[k] m_k (+ w_t m_t).

    Predictor, or corrector (UniC-p, ``corrector=True``) with m_t the model output at the predicted x~_t; p, d,
    relax, data traced scalars; ``avail`` the number of earlier outputs in the history (entries beyond it get
    placeholder nodes, never used). ``lambdas`` [HISTORY(, B)] at the history points (lag 0 = s).
    """
    h = t.lam - s.lam
    hh = jnp.where(data, -h, h)
    c = jnp.where(data, t.alpha, t.sigma)
    ratio = jnp.where(data, t.sigma / s.sigma, t.alpha / s.alpha)
    e = jnp.expm1(hh)
    phis = h_phis(hh)
    g = [phis[0], 2.0 * phis[1], 6.0 * phis[2]]
    relax_c = relax_c.astype(h.dtype)
    g1_relaxed = jnp.select([relax == 1, relax == 2, relax == 3], [0.5 * hh, 0.5 * e, g[0] * (1.0 + relax_c * h)],
                            g[0])
    r = []
    nodes = p - 1 if corrector else jnp.where(p >= 2, d, 0)
    for k in (1, 2):
        r_k = (lambdas[k] - lambdas[0]) / h
        r.append(jnp.where((nodes >= k) & (avail >= k), r_k, -1.0 if k == 1 else r[-1] - 1.0))
    zero = jnp.zeros_like(h)
    if not corrector:
        w = [zero, zero]
        for pp in (2, 3):
            for dn in (1, 2):
                if dn < pp - 1:
                    continue
                moments = g[:pp - 1] + [zero] * (dn - pp + 1)
                if dn == 1:
                    moments = [g1_relaxed]
                wts = _lagrange_weights(r[:dn], moments)
                sel = (p == pp) & (d == dn)
                w = [jnp.where(sel, wts[k], w[k]) if k < dn else w[k] for k in range(2)]
        w_t = zero
    else:  # UniC-p: nodes r_1..r_{p-1}, 1
        w, w_t = [zero, zero], jnp.where(p == 1, g1_relaxed, zero)
        for pp in (2, 3):
            wts = _lagrange_weights(r[:pp - 1] + [jnp.ones_like(h)], g[:pp])
            w = [jnp.where(p == pp, wts[k], w[k]) if k < pp - 1 else w[k] for k in range(2)]
            w_t = jnp.where(p == pp, wts[-1], w_t)
    # ratio x - c e m_0 - c (sum_k w_k (m_k - m_0) / r_k + w_t (m_t - m_0)), regrouped by m.
    by_d = [w_k / r_k for w_k, r_k in zip(w, r)]
    lag0 = -c * e + c * (by_d[0] + by_d[1] + w_t)
    return ratio, jnp.stack([lag0, -c * by_d[0], -c * by_d[1]]), -c * w_t


class USFState(NamedTuple):
    x: jax.Array         # [B, ...] predicted x at t_i: where the next model call evaluates
    x_prev: jax.Array    # [B, ...] corrected x at t_{i-1}
    hist_eps: jax.Array  # [HISTORY + 1, B, ...] ring buffers of the outputs (step j's in slot j % (HISTORY + 1))
    hist_x0: jax.Array   # [HISTORY + 1, B, ...]


def make_usf(schedule, num_steps: int, *, spec: USFSpec | None = None, afs: bool | None = None) -> Solver:
    """The generic scan of a USF spec over ``num_steps`` intervals. The spec's per-step choices are grid data
    (``grid["spec"]``, from ``spec`` or traced ``arrays`` for a search); ``afs`` (from the spec) is static."""
    if spec is not None:
        if not isinstance(spec, USFSpec):
            raise ValueError(f"solver 'usf': spec must be a USFSpec, got {type(spec).__name__}")
        spec.validate()
        if spec.num_steps != num_steps:
            raise ValueError(f"solver 'usf': the spec has {spec.num_steps} steps, the grid {num_steps}")
        afs = spec.afs
    elif afs is None:
        raise ValueError("solver 'usf': give spec=USFSpec(...) (see dpmjax.samplers.usf.known_spec, "
                         "dpmjax.search.s3), or arrays= with afs=")
    afs = bool(afs)

    size = HISTORY + 1  # one slot more than the corrector reaches back: it reads the ring after step i's write

    def advance(state, i, grid, out):
        arrays = grid["spec"]
        t_next, t_i, s, lam = step_points(schedule, grid["t"], i, HISTORY, num_steps)
        prev = jnp.maximum(i - 1, 0)
        # write first, read after (no copy of the rings)
        slot = ring_slot(i, size)
        hist_eps = jax.lax.dynamic_update_index_in_dim(state.hist_eps, out.eps, slot, 0)
        hist_x0 = jax.lax.dynamic_update_index_in_dim(state.hist_x0, out.x0, slot, 0)
        # (a) corrector of step i - 1 with the fresh output at t_i (history lag 0 = step i - 1)
        data_prev = arrays["data"][prev]
        ratio, w, w_t = usf_weights(lam[1:].at[0].set(s.lam), s, t_i, arrays["order"][prev],
                                    arrays["deriv_order"][prev], arrays["relax"][prev], arrays["relax_c"][prev],
                                    data=data_prev, avail=i - 1, corrector=True)
        x = state.x
        corrected = (expand_like(ratio, x) * state.x_prev
                     + combine_lags(jnp.where(data_prev, hist_x0, hist_eps), w, i - 1)
                     + expand_like(w_t, x) * jnp.where(data_prev, out.x0, out.eps))
        x = jnp.where((i >= 1) & arrays["corrector"][prev], corrected, x)
        # (b) predictor of step i
        ii = jnp.minimum(i, num_steps - 1)
        data = arrays["data"][ii]
        ratio, w, _ = usf_weights(lam[:HISTORY], t_i, t_next, arrays["order"][ii], arrays["deriv_order"][ii],
                                  arrays["relax"][ii], arrays["relax_c"][ii], data=data, avail=i)
        x_next = expand_like(ratio, x) * x + combine_lags(jnp.where(data, hist_x0, hist_eps), w, i)
        return USFState(x=x_next, x_prev=x, hist_eps=hist_eps, hist_x0=hist_x0)

    def init(x_T, key, grid):
        zeros = jnp.zeros((size,) + x_T.shape, x_T.dtype)
        state = USFState(x=x_T, x_prev=x_T, hist_eps=zeros, hist_x0=zeros)
        if afs:  # x0 = 0 at t_0: eps = x_T / sigma_0
            sigma = expand_like(at_time(schedule, grid["t"][0]).sigma, x_T)
            state = advance(state, jnp.asarray(0, jnp.int32), grid,
                            ModelEval(eps=x_T / sigma, x0=jnp.zeros_like(x_T)))
        return state

    def query(state, j, grid):
        return state.x, grid["t"][j + int(afs)]

    def update(state, j, grid, out):
        return advance(state, j + int(afs), grid, out)

    return Solver(num_model_calls=num_steps - int(afs), init=init, query=query, update=update,
                  output=lambda state: state.x, uses="both")


def prepare_usf(schedule, times, *, spec: USFSpec | None = None, arrays: dict | None = None, **_):
    """Grid data: the spec's per-step fields as arrays (``spec_arrays``), or the given (traced) ``arrays``."""
    num_steps = times.shape[0] - 1
    if spec is not None:
        if not isinstance(spec, USFSpec):
            raise ValueError(f"solver 'usf': spec must be a USFSpec, got {type(spec).__name__}")
        return {"spec": spec_arrays(spec)}
    if arrays is None:
        raise ValueError("solver 'usf': give spec=USFSpec(...) (see dpmjax.samplers.usf.known_spec, dpmjax.search.s3)")
    missing = sorted(set(SPEC_FIELDS) - set(arrays))
    if missing:
        raise ValueError(f"solver 'usf': arrays lacks {missing}")
    for key in SPEC_FIELDS:
        if np.shape(arrays[key]) != (num_steps,):
            raise ValueError(f"solver 'usf': arrays[{key!r}] must have shape ({num_steps},), got "
                             f"{np.shape(arrays[key])}")
    return {"spec": dict(arrays)}


def _spec_of(options):
    spec = options.get("spec")
    if not isinstance(spec, USFSpec):
        raise ValueError("usf: give spec=USFSpec(...) (see dpmjax.samplers.usf.known_spec, dpmjax.search.s3)")
    return spec


def usf_steps_for_nfe(nfe, **options):
    spec = _spec_of(options)
    if nfe != spec.nfe:
        raise ValueError(f"usf: the spec is for nfe={spec.nfe}, not nfe={nfe}")
    return spec.num_steps


def grid_usf(schedule, n, spacing, t_start, t_end, **options):
    spec = _spec_of(options)
    if n != spec.num_steps:
        raise ValueError("usf: a spec brings its own time points; final_sigma='zero' is not supported with nfe= "
                         "(put the sigma = 0 end into the spec's grid via timesteps= instead)")
    return np.asarray(spec.timesteps, np.float64)
