"""DC-Solver's compensation-ratio search, its cascade polynomial regression (CPR), and the ratio files.

Search (Zhao et al. 2024, Sec. 3.3; official ``search`` loops): greedy along the trajectory. At step i, with
the state before the step and the model output m_i fixed, rho_i (init 1) minimises

    L(rho_i) = mean || x_{t_{i+1}}(rho_i) - x^GT_{t_{i+1}} ||^2

by AdamW (lr 0.1, ``num_iters`` iterations), where x_{t_{i+1}} is the *corrected* sample at t_{i+1} (the next
UniC, one model call per iteration, as the diffusers version of the search) or, at the last step, the final
sample. The chosen rho_i is applied and the search moves on along the compensated trajectory. The whole
search is one jitted program (a ``lax.scan`` over steps with an inner ``lax.fori_loop`` over iterations),
differentiating through the interpolation, the UniPC update and the model's next evaluation.
Ground truth: ``oracle_targets`` (the exact ODE solution at the grid times) or ``model_targets`` (a fine
solve of any model whose grid contains the coarse one; the official code uses 200 DDIM steps).

CPR (official ``cpr_coeffs``): rho(step) = sum_{j=0}^{3} c_j(g, NFE) (step/NFE)^j, c_j quadratic in g/12 with
coefficients quadratic in NFE/50: 36 coefficients, fitted here by ridge least squares on searched ratios.
"""
from __future__ import annotations

import hashlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.samplers.driver import device_grid, make_evaluate, plan, sample

FORMAT = "dpmjax-dc-ratios-v1"


def schedule_id(schedule) -> str:
    """A short stable id of a schedule: class name + hash of log alpha at 33 times."""
    lo, hi = schedule.time_range
    with jax.ensure_compile_time_eval():
        values = np.asarray(schedule.log_alpha(jnp.linspace(lo, hi, 33, dtype=jnp.float32)), np.float32)
    return f"{type(schedule).__name__}:{hashlib.sha1(np.round(values, 5).tobytes()).hexdigest()[:12]}"


def oracle_targets(mixture, x_T, timesteps, schedule) -> np.ndarray:
    """[N+1, B, ...]: the exact ODE solution from x_T at every grid time (float64)."""
    from dpmjax.oracle import ode_solution

    ts = np.asarray(timesteps, np.float64)
    out = [np.asarray(x_T, np.float64)]
    for k in range(1, len(ts)):
        out.append(ode_solution(mixture, out[-1], float(ts[k - 1]), float(ts[k]), schedule))
    return np.stack(out)


def model_targets(model_fn, x_T, timesteps, schedule, *, prediction: str = "eps", substeps: int = 20,
                  solver: str = "dpmpp_3m") -> jax.Array:
    """[N+1, B, ...]: a fine solve (``substeps`` per interval, uniform in lambda) read at the grid times."""
    from dpmjax.samplers import sample

    lam = np.asarray(schedule.lambda_(jnp.asarray(timesteps, jnp.float64 if jax.config.jax_enable_x64
                                                  else jnp.float32)), np.float64)
    fine = [float(timesteps[0])]
    for k in range(len(lam) - 1):
        inner = np.linspace(lam[k], lam[k + 1], substeps + 1)[1:-1]
        fine += [float(v) for v in np.asarray(schedule.t_of_lambda(jnp.asarray(inner)))] + [float(timesteps[k + 1])]
    _, traj = sample(model_fn, x_T, schedule=schedule, solver=solver, timesteps=np.asarray(fine),
                     prediction=prediction, return_trajectory=True)
    return jnp.concatenate([jnp.asarray(x_T)[None], traj[substeps - 1::substeps]])


def search_dc_ratios(model_fn, x_T, targets, *, schedule, timesteps, prediction: str = "eps", num_iters: int = 20,
                     lr: float = 0.1, weight_decay: float = 0.01, include_corrector: bool = True,
                     objective: str = "greedy", **solver_options):
    """Gradient search of the DC ratios; returns (ratios np [N], info dict with seconds).

    ``timesteps`` is the solver grid ([N+1], as ``dpmjax.samplers.plan(...).grid["t"]``), ``targets`` the
    reference [N+1, B, ...] at those times (same x_T), ``solver_options`` those of ``dc_solver`` (order,
    variant, ...). ``objective="greedy"`` is the official per-step search: it optimises rho_i on the cached state
    before step i, so it drives the library solver's own step functions (``plan(...).solver.query/update`` with the
    ratios as grid data) inside one jitted scan. ``"final"`` (ours) descends on all ratios at once against the
    final-time error only, ``num_iters`` * N AdamW steps through the library sampler (``sample`` with traced
    ratios).
    """
    if objective not in ("greedy", "final"):
        raise ValueError(f"objective must be 'greedy' or 'final', got {objective!r}")
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive integer (the search budget per step), got {num_iters!r}")
    timesteps = np.asarray(timesteps, np.float64)
    num_steps = timesteps.shape[0] - 1
    if targets.shape[0] != num_steps + 1 or targets.shape[1:] != x_T.shape:
        raise ValueError(f"targets must have shape {(num_steps + 1,) + tuple(x_T.shape)}, got {targets.shape}")
    dc_order = solver_options.get("dc_order", 2)
    if num_steps <= dc_order:
        raise ValueError(f"search: {num_steps} steps leave no step with compensation (needs > dc_order={dc_order})")
    p = plan(schedule, "dc_solver", timesteps=timesteps, **solver_options)
    sol = p.solver
    evaluate = make_evaluate(model_fn, schedule, prediction)

    def run(x_T, targets):
        dtype = x_T.dtype
        grid = device_grid(p.grid, dtype)
        with_ratios = lambda ratios: {**grid, "ratios": ratios}  # noqa: E731

        def loss_fn(rho, ratios, state, i, out):
            g = with_ratios(ratios.at[i].set(rho))
            st = sol.update(state, i, g, out)
            x = st.x
            if include_corrector:
                nxt = jnp.minimum(i + 1, num_steps)
                corrected = sol.update(st, nxt, g, evaluate(*sol.query(st, nxt, g))).x_prev
                x = jnp.where(i + 1 < num_steps, corrected, x)
            return jnp.mean((x - targets[i + 1]) ** 2)

        grad_fn = jax.value_and_grad(loss_fn)

        def step(carry, i):
            state, ratios = carry
            out = evaluate(*sol.query(state, i, with_ratios(ratios)))

            def iterate(k, c):
                rho, opt, best, best_loss = c
                loss, g = grad_fn(rho, ratios, state, i, out)
                better = loss < best_loss
                best, best_loss = jnp.where(better, rho, best), jnp.where(better, loss, best_loss)
                rho, opt = _adamw(rho, g, opt, k, lr, weight_decay)
                return rho, opt, best, best_loss

            rho0 = jnp.asarray(1.0, ratios.dtype)
            init = (rho0, (jnp.zeros_like(rho0), jnp.zeros_like(rho0)), rho0, jnp.asarray(jnp.inf, rho0.dtype))
            rho, _, best, best_loss = jax.lax.fori_loop(0, num_iters, iterate, init)
            final = loss_fn(rho, ratios, state, i, out)  # the last iterate counts too
            best = jnp.where(final < best_loss, rho, best)
            best = jnp.where(i >= dc_order, best, rho0)
            ratios = ratios.at[i].set(best)
            return (sol.update(state, i, with_ratios(ratios), out), ratios), best

        ratios = jnp.ones((num_steps,), grid["t"].dtype)
        state = sol.init(x_T, jax.random.key(0), with_ratios(ratios))
        (state, ratios), _ = jax.lax.scan(step, (state, ratios), jnp.arange(num_steps, dtype=jnp.int32))
        return ratios

    def run_final(x_T, targets):
        def loss_fn(ratios):
            x_0 = sample(model_fn, x_T, schedule=schedule, solver="dc_solver", timesteps=timesteps, ratios=ratios,
                         prediction=prediction, **solver_options)
            return jnp.mean((x_0 - targets[-1]) ** 2)

        grad_fn = jax.value_and_grad(loss_fn)
        active = jnp.arange(num_steps) >= dc_order

        def iterate(k, c):
            ratios, opt, best, best_loss = c
            loss, g = grad_fn(ratios)
            better = loss < best_loss
            best, best_loss = jnp.where(better, ratios, best), jnp.where(better, loss, best_loss)
            ratios, opt = _adamw(ratios, jnp.where(active, g, 0.0), opt, k, lr, weight_decay)
            return jnp.where(active, ratios, 1.0), opt, best, best_loss

        r0 = jnp.ones((num_steps,), x_T.dtype)
        init = (r0, (jnp.zeros_like(r0), jnp.zeros_like(r0)), r0, jnp.asarray(jnp.inf, x_T.dtype))
        ratios, _, best, best_loss = jax.lax.fori_loop(0, num_iters * num_steps, iterate, init)
        return jnp.where(loss_fn(ratios) < best_loss, ratios, best)

    start = time.perf_counter()
    run = run if objective == "greedy" else run_final
    ratios = np.asarray(jax.jit(run)(jnp.asarray(x_T), jnp.asarray(targets, jnp.asarray(x_T).dtype)))
    return ratios, {"seconds": time.perf_counter() - start, "num_iters": num_iters, "lr": lr, "objective": objective,
                    "num_datapoints": int(x_T.shape[0])}


def _adamw(p, g, moments, k, lr, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
    """One AdamW step (optax.adamw / torch.optim.AdamW; written out since optax's int step count trips the
    strict dtype promotion this library runs under)."""
    m, v = moments
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step = (k + 1).astype(p.dtype)
    m_hat, v_hat = m / (1 - b1 ** step), v / (1 - b2 ** step)
    return p - lr * (m_hat / (jnp.sqrt(v_hat) + eps) + weight_decay * p), (m, v)


# --------------------------------------------------------------------------------------------------------
# Cascade polynomial regression
# --------------------------------------------------------------------------------------------------------

def _cpr_features(nfe, guidance, steps):
    s = np.asarray(steps, np.float64) / nfe
    g, n = guidance / 12.0, nfe / 50.0
    return np.stack([s ** j * g ** a * n ** b for j in range(4) for a in range(3) for b in range(3)], -1)


def fit_cpr(configs, *, dc_order: int = 2, ridge: float = 1e-6) -> np.ndarray:
    """36 CPR coefficients from searched configs [(nfe, guidance_scale, ratios [N]), ...] (ridge least squares)."""
    if len(configs) < 1:
        raise ValueError("fit_cpr needs at least one searched (nfe, guidance, ratios) configuration")
    rows, values = [], []
    for nfe, guidance, ratios in configs:
        ratios = np.asarray(ratios, np.float64)
        steps = np.arange(dc_order, len(ratios))
        rows.append(_cpr_features(nfe, guidance, steps))
        values.append(ratios[steps])
    a, y = np.concatenate(rows), np.concatenate(values)
    return np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ y)


def predict_cpr(coeffs, nfe: int, guidance: float = 1.0, num_steps: int | None = None, *,
                dc_order: int = 2) -> np.ndarray:
    """Ratios [num_steps] (default nfe) predicted by CPR; 1 where compensation is inactive."""
    coeffs = np.asarray(coeffs, np.float64)
    if coeffs.shape != (36,):
        raise ValueError(f"CPR coefficients must have shape (36,), got {coeffs.shape}")
    num_steps = nfe if num_steps is None else num_steps
    ratios = _cpr_features(nfe, guidance, np.arange(num_steps)) @ coeffs
    ratios[:dc_order] = 1.0
    return ratios


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------

def save_ratios(path, ratios, *, nfe: int, schedule, model_id: str, options: dict | None = None, info=None):
    meta = {"format": FORMAT, "nfe": int(nfe), "schedule": schedule_id(schedule), "model_id": str(model_id),
            "options": options or {}, "info": info or {}, "ratios": [float(r) for r in np.asarray(ratios)]}
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)


def load_ratios(path, *, nfe: int, schedule, model_id: str) -> np.ndarray:
    """The ratios of a file written by ``save_ratios``; ValueError if it was searched for another setting."""
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a DC ratio file (format {meta.get('format')!r}, expected {FORMAT!r})")
    want = {"nfe": int(nfe), "schedule": schedule_id(schedule), "model_id": str(model_id)}
    for key, value in want.items():
        if meta[key] != value:
            raise ValueError(f"{path}: ratios were searched for {key}={meta[key]!r}, not {key}={value!r}; "
                             "search again for this setting (or predict them with CPR)")
    return np.asarray(meta["ratios"], np.float64)
