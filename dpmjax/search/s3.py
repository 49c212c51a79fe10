"""S^3 (Liu et al., ICLR 2024): predictor-based evolutionary search of a USF solver schedule for a target NFE.

1. Seed population: hand-made solvers as specs (``known_spec``: DPM-Solver++(2M), UniPC-2/3 bh1/bh2, on
   logSNR / time-uniform / time-quadratic grids), each evaluated with the cheap metric.
2. Metric: RMS error of the final sample against a reference on a few datapoints (the paper uses FID on
   1,000 samples; with the exact oracle a trajectory error is the cheap, noise-free analogue). Evaluation is a
   jitted program over traced spec arrays: one compilation per (steps, AFS) shape for the whole search.
3. Predictor: ridge regression from spec features (time points as fractions of the logSNR range, one-hot
   order / deriv-order / prediction type / relaxation / corrector per step, AFS) to log(metric), refitted
   after every generation on all evaluated specs.
4. Evolution: parents by rank among the best, uniform crossover of per-step fields (p = 0.5), per-field
   mutation (p = 0.3; times by a Gaussian of std 0.03 in the logSNR fraction, as the official code), repair
   to valid specs; the predictor ranks ``proposals`` candidates, the best ``per_generation`` are evaluated.
``budget`` counts true evaluations (the seeds included); the best evaluated spec is returned.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.samplers.driver import sample
from dpmjax.samplers.usf import RELAXATIONS, USFSpec, known_spec, spec_arrays
from dpmjax.search.dc import schedule_id

FORMAT = "dpmjax-usf-spec-v1"


def seed_specs(schedule, nfe: int, t_end=None) -> list:
    specs = []
    for spacing in ("logSNR", "time_uniform", "time_quadratic"):
        from dpmjax.schedules import time_grid
        ts = np.asarray(time_grid(schedule, nfe, spacing, t_end=t_end), np.float64)
        specs.append(known_spec("dpmpp_2m", schedule, nfe, timesteps=ts))
        for order in (2, 3):
            for variant in ("bh1", "bh2"):
                specs.append(known_spec("unipc", schedule, nfe, order=order, variant=variant, timesteps=ts))
    return specs


def _lam(schedule, ts):
    return np.asarray(schedule.lambda_(jnp.asarray(ts, jnp.float32)), np.float64)


def features(spec: USFSpec, schedule) -> np.ndarray:
    lam = _lam(schedule, spec.timesteps)
    frac = (lam[1:-1] - lam[0]) / (lam[-1] - lam[0])
    per_step = [np.eye(3)[np.asarray(spec.order) - 1], np.eye(2)[np.asarray(spec.deriv_order) - 1],
                np.asarray(spec.data, float)[:, None], np.eye(4)[[RELAXATIONS.index(r) for r in spec.relax]],
                np.asarray(spec.corrector, float)[:, None], np.asarray(spec.relax_c)[:, None]]
    return np.concatenate([frac, np.concatenate(per_step, 1).ravel(), [float(spec.afs), 1.0]])


def repair(spec: USFSpec) -> USFSpec:
    order, deriv = list(spec.order), list(spec.deriv_order)
    for i in range(len(order)):
        order[i] = int(min(max(order[i], 1), 3, i + 1))
        deriv[i] = int(min(max(deriv[i], order[i] - 1, 1), 2, max(i, 1)))
    return USFSpec(**{**spec.__dict__, "order": tuple(order), "deriv_order": tuple(deriv)}).validate()


def mutate(spec: USFSpec, schedule, rng, p: float = 0.3, time_std: float = 0.03) -> USFSpec:
    n = spec.num_steps
    ts = np.asarray(spec.timesteps, np.float64)
    if rng.random() < p and n > 1:
        lam = _lam(schedule, ts)
        frac = (lam[1:-1] - lam[0]) / (lam[-1] - lam[0]) + rng.normal(0, time_std, n - 1)
        frac = np.sort(np.clip(frac, 1e-3, 1 - 1e-3))
        frac = np.maximum.accumulate(frac + np.arange(n - 1) * 1e-4)
        inner = np.asarray(schedule.t_of_lambda(jnp.asarray(lam[0] + frac * (lam[-1] - lam[0]), jnp.float32)),
                           np.float64)
        new = np.concatenate([[ts[0]], inner, [ts[-1]]])
        if np.all(np.diff(new) < 0):
            ts = new

    def field(values, choices):
        return tuple(rng.choice(choices) if rng.random() < p else v for v in values)
    fields = dict(order=field(spec.order, [1, 2, 3]), deriv_order=field(spec.deriv_order, [1, 2]),
                  data=tuple(bool(v) for v in field(spec.data, [True, False])),
                  relax=tuple(str(v) for v in field(spec.relax, list(RELAXATIONS))),
                  relax_c=tuple(float(v + rng.normal(0, 0.3)) if rng.random() < p else v for v in spec.relax_c),
                  corrector=tuple(bool(v) for v in field(spec.corrector, [True, False])))
    return repair(USFSpec(timesteps=tuple(float(t) for t in ts), afs=spec.afs, **fields))


def crossover(a: USFSpec, b: USFSpec, rng) -> USFSpec:
    if a.num_steps != b.num_steps:
        return a
    take = rng.random(a.num_steps) < 0.5
    fields = {f: tuple(y if t else x for x, y, t in zip(getattr(a, f), getattr(b, f), take))
              for f in ("data", "order", "deriv_order", "relax", "relax_c", "corrector")}
    ts = a.timesteps if rng.random() < 0.5 else b.timesteps
    return repair(USFSpec(timesteps=ts, afs=a.afs, **fields))


class SpecEvaluator:
    """RMS final-sample error of a spec on (x_T, reference): the library sampler (``solver="usf"``) with the spec's
    times and per-step choices as traced grid data, one jitted program per (steps, afs)."""

    def __init__(self, model_fn, schedule, x_T, reference, prediction):
        self.model_fn, self.prediction = model_fn, prediction
        self.schedule, self.x_T, self.reference = schedule, jnp.asarray(x_T), jnp.asarray(reference)
        self.compiled = {}

    def __call__(self, spec: USFSpec) -> float:
        key = (spec.num_steps, spec.afs)
        if key not in self.compiled:
            def run(arrays, ts, x_T, ref):
                x_0 = sample(self.model_fn, x_T, schedule=self.schedule, solver="usf", timesteps=ts, arrays=arrays,
                             afs=spec.afs, prediction=self.prediction)
                return jnp.sqrt(jnp.mean((x_0 - ref) ** 2))
            self.compiled[key] = jax.jit(run)
        value = self.compiled[key](spec_arrays(spec), np.asarray(spec.timesteps, np.float64), self.x_T,
                                   self.reference)
        value = float(value)
        return value if np.isfinite(value) else 1e9


def s3_search(model_fn, schedule, nfe: int, x_T, reference, *, budget: int = 60, prediction: str = "eps",
              t_end=None, proposals: int = 200, per_generation: int = 4, seed: int = 0, allow_afs: bool = True):
    """Search a USF spec for ``nfe`` model calls; returns (best spec, info with the evaluated (metric, spec))."""
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer number of evaluated candidates, got {budget!r}")
    rng = np.random.default_rng(seed)
    evaluator = SpecEvaluator(model_fn, schedule, x_T, reference, prediction)
    start = time.perf_counter()
    seeds = seed_specs(schedule, nfe, t_end)
    if allow_afs:  # the same solvers with one more step and the analytic first step
        seeds += [USFSpec(**{**s.__dict__, "afs": True}) for s in seed_specs(schedule, nfe + 1, t_end)[:5]]
    seeds = [repair(s) for s in seeds]
    evaluated = []
    for spec in seeds[:budget]:
        evaluated.append((evaluator(spec), spec))
    while len(evaluated) < budget:
        evaluated.sort(key=lambda e: e[0])
        x = np.stack([features(s, schedule) for _, s in evaluated if s.afs == evaluated[0][1].afs])
        y = np.log([m for m, s in evaluated if s.afs == evaluated[0][1].afs])
        weights = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ y)
        top = [s for _, s in evaluated[:max(4, len(evaluated) // 4)]]
        rank_p = 1.0 / np.arange(1, len(top) + 1)
        rank_p /= rank_p.sum()
        cands = []
        for _ in range(proposals):
            a, b = (top[k] for k in rng.choice(len(top), 2, p=rank_p))
            child = mutate(crossover(a, b, rng) if rng.random() < 0.5 else a, schedule, rng)
            if child.afs == evaluated[0][1].afs:
                cands.append(child)
        seen = {s for _, s in evaluated}
        cands = [c for c in dict.fromkeys(cands) if c not in seen]
        if not cands:
            continue
        scores = np.stack([features(c, schedule) for c in cands]) @ weights
        for k in np.argsort(scores)[:min(per_generation, budget - len(evaluated))]:
            evaluated.append((evaluator(cands[k]), cands[k]))
    evaluated.sort(key=lambda e: e[0])
    return evaluated[0][1], {"seconds": time.perf_counter() - start, "evaluated": len(evaluated),
                             "best_metric": evaluated[0][0], "seed_best": min(m for m, s in evaluated if s in seeds),
                             "history": evaluated}


def save_spec(path, spec: USFSpec, *, schedule, model_id: str, metric=None):
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "nfe": spec.nfe, "schedule": schedule_id(schedule), "model_id": str(model_id),
                   "metric": metric, "spec": spec.to_json()}, f, indent=1)


def load_spec(path, *, nfe: int, schedule, model_id: str) -> USFSpec:
    """A spec saved by ``save_spec``; ValueError if it was searched for another nfe, schedule or model."""
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a USF spec file (format {meta.get('format')!r}, expected {FORMAT!r})")
    for key, value in (("nfe", int(nfe)), ("schedule", schedule_id(schedule)), ("model_id", str(model_id))):
        if meta[key] != value:
            raise ValueError(f"{path}: the spec was searched for {key}={meta[key]!r}, not {key}={value!r}")
    return USFSpec.from_json(meta["spec"])
