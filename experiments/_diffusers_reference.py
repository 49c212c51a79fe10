"""Run diffusers' PyTorch schedulers on a dpmjax Gaussian-mixture oracle, in float64 (benchmark helper).

The torch "model" returns the oracle's exact eps, computed in numpy/JAX float64 from the noise level the
scheduler itself uses:

* VP schedulers (DDIM, PNDM, DPM-Solver multistep/singlestep, UniPC) feed x_t and an integer timestep k;
  dpmjax's ``DiscreteVP`` puts k at t = (k + 1)/N, so eps = oracle.eps(x, (k + 1)/N).
* k-diffusion-style schedulers (Euler, Heun) feed x / sqrt(1 + sigma^2) and a (fractional) timestep; the
  model reads sigma = scheduler.sigmas[step_index] (diffusers interpolates sigma linearly between integer
  timesteps) and returns eps_ve(x_in sqrt(1 + sigma^2), sigma), the exact eps at that noise level.

Each run returns the output, the number of model calls actually made, the time grid in dpmjax's
continuous time (so dpmjax can be run on the same grid) and where the run started and ended, so the exact
ODE reference (``dpmjax.oracle.ode_solution``) can be taken between the same two points.
diffusers keeps its schedule (alphas_cumprod, sigmas) in float32; only the samples are float64, which sets
an error floor near 1e-7 relative.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CONFIGS", "DiffusersConfig", "run_diffusers"]

BETA_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@dataclasses.dataclass(frozen=True)
class DiffusersConfig:
    """One diffusers scheduler setting and the dpmjax solver (with options) that matches it."""

    label: str
    scheduler: str            # class name in diffusers
    kwargs: tuple             # scheduler config items
    kind: str                 # "vp" (x_t, integer k) or "ve" (k-diffusion scaled input, sigmas)
    ours: str                 # matching dpmjax solver name ("" for none)
    ours_options: tuple = ()  # its options
    nfe_to_steps: str = "n"   # how num_inference_steps follows from the target NFE: "n", "n-1", "heun"
    wasted_calls: int = 0     # model calls whose output never reaches the result


CONFIGS = (
    DiffusersConfig("DDIM", "DDIMScheduler", (("set_alpha_to_one", True), ("clip_sample", False)), "vp", "ddim"),
    DiffusersConfig("DPMSolverMultistep dpmsolver++ 2M", "DPMSolverMultistepScheduler",
                    (("algorithm_type", "dpmsolver++"), ("solver_order", 2)), "vp", "dpmpp_2m"),
    DiffusersConfig("DPMSolverMultistep dpmsolver++ 3M", "DPMSolverMultistepScheduler",
                    (("algorithm_type", "dpmsolver++"), ("solver_order", 3)), "vp", "dpmpp_3m"),
    # diffusers refuses final_sigmas_type="zero" for the noise-prediction algorithm: it ends at t = 1/N.
    DiffusersConfig("DPMSolverMultistep dpmsolver 2M (sigma_min end)", "DPMSolverMultistepScheduler",
                    (("algorithm_type", "dpmsolver"), ("solver_order", 2), ("final_sigmas_type", "sigma_min")),
                    "vp", "dpm_solver_2m"),
    DiffusersConfig("DPMSolverSinglestep dpmsolver++ 2S", "DPMSolverSinglestepScheduler",
                    (("solver_order", 2),), "vp", "dpmpp_2s"),
    # With a sigma = 0 end diffusers forces the last *call* to order 1 (orders [1,2,3]*k + [1]); dpmjax's
    # singlestep runs the official order list on the grid without the sigma = 0 point, then the x0 step:
    # the same only when N - 1 is a multiple of 3 plus 1. dpmjax has no data-prediction 3S: no match.
    DiffusersConfig("DPMSolverSinglestep dpmsolver++ 3S", "DPMSolverSinglestepScheduler",
                    (("solver_order", 3),), "vp", ""),
    DiffusersConfig("DPMSolverSinglestep dpmsolver 2S (sigma_min end)", "DPMSolverSinglestepScheduler",
                    (("algorithm_type", "dpmsolver"), ("solver_order", 2), ("final_sigmas_type", "sigma_min")),
                    "vp", "dpm_solver_2"),
    DiffusersConfig("DPMSolverSinglestep dpmsolver 3S (sigma_min end)", "DPMSolverSinglestepScheduler",
                    (("algorithm_type", "dpmsolver"), ("solver_order", 3), ("final_sigmas_type", "sigma_min")),
                    "vp", "dpm_solver_3"),
    DiffusersConfig("UniPC bh1", "UniPCMultistepScheduler", (("solver_type", "bh1"),), "vp", "unipc"),
    DiffusersConfig("UniPC bh2", "UniPCMultistepScheduler", (("solver_type", "bh2"),), "vp", "unipc"),
    # bh1 with the default sigma = 0 end returns NaN in diffusers 0.42 (see BENCHMARKS.md); also run it to t = 1/N.
    DiffusersConfig("UniPC bh1 (sigma_min end)", "UniPCMultistepScheduler",
                    (("solver_type", "bh1"), ("final_sigmas_type", "sigma_min")), "vp", "unipc"),
    DiffusersConfig("PNDM skip_prk_steps (PLMS)", "PNDMScheduler",
                    (("skip_prk_steps", True), ("set_alpha_to_one", True)), "vp", "plms", nfe_to_steps="n-1"),
    # diffusers' default set_alpha_to_one=False: the last step goes from k = 0 to alphas_cumprod[0], i.e. it
    # stays put, and its model call is wasted; the result is PLMS on the grid ending at t = 1/N.
    DiffusersConfig("PNDM skip_prk_steps (PLMS), set_alpha_to_one=False", "PNDMScheduler",
                    (("skip_prk_steps", True), ("set_alpha_to_one", False)), "vp", "plms", nfe_to_steps="n-1",
                    wasted_calls=1),
    DiffusersConfig("EulerDiscrete", "EulerDiscreteScheduler", (), "ve", "euler"),
    DiffusersConfig("HeunDiscrete", "HeunDiscreteScheduler", (), "ve", "heun", nfe_to_steps="heun"),
)


def steps_for_nfe(config: DiffusersConfig, nfe: int) -> int:
    if config.nfe_to_steps == "n-1":   # PLMS evaluates its first timestep twice: N steps = N + 1 calls
        return nfe - 1
    if config.nfe_to_steps == "heun":  # 2 calls per step, the last (to sigma = 0) 1: 2N - 1 calls
        return (nfe + 1) // 2
    return nfe


def build_scheduler(config: DiffusersConfig, schedule_name: str):
    import diffusers

    cls = getattr(diffusers, config.scheduler)
    kwargs = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                  beta_schedule=BETA_NAMES[schedule_name], **dict(config.kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kwargs)


def _dedupe(values):
    out = []
    for v in values:
        if not out or v != out[-1]:
            out.append(v)
    return out


def run_diffusers(config: DiffusersConfig, schedule_name: str, schedule, mixture, x_T: np.ndarray, nfe: int):
    """Run one diffusers scheduler for (about) ``nfe`` model calls from x_T (float64 [B, D]).

    Returns a dict: x (float64 [B, D], the VP sample at the end), nfe (calls made), t_start (dpmjax time of
    the first point; x_T is taken to lie there), end ("zero" or a dpmjax time), grid (dpmjax times of the
    grid without the sigma = 0 end), steps (num_inference_steps).
    """
    import torch

    scheduler = build_scheduler(config, schedule_name)
    steps = steps_for_nfe(config, nfe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler.set_timesteps(steps)
    n_train = scheduler.config.num_train_timesteps
    eps_ve, eps_t = _oracle_functions(mixture, schedule)
    calls = [0]

    if config.kind == "vp":
        ks = [int(k) for k in scheduler.timesteps.numpy()]
        grid = [(k + 1) / n_train for k in _dedupe(ks)]
        t_start = grid[0]
        end = _vp_end(config, scheduler, n_train)

        def model(x_in, timestep):
            calls[0] += 1
            t = jnp.full((x_in.shape[0],), (float(timestep) + 1) / n_train, jnp.float64)
            return torch.from_numpy(np.asarray(eps_t(jnp.asarray(x_in.numpy()), t)).copy())

        x = torch.from_numpy(np.array(x_T, dtype=np.float64))
    else:
        sig = scheduler.sigmas.numpy().astype(np.float64)
        uniq = [s for s in _dedupe(list(sig)) if s > 0]
        with jax.ensure_compile_time_eval():
            grid = [float(v) for v in np.asarray(schedule.t_of_lambda(-jnp.log(jnp.asarray(uniq, jnp.float64))))]
        t_start, end = grid[0], "zero"

        def model(x_in, timestep):
            calls[0] += 1
            s = float(scheduler.sigmas[scheduler.step_index])
            y = jnp.asarray(x_in.numpy()) * np.sqrt(1.0 + s * s)
            return torch.from_numpy(np.asarray(eps_ve(y, jnp.float64(s))).copy())

        # k-diffusion variables: x_ve = x_vp / alpha = x_vp sqrt(1 + sigma^2).
        x = torch.from_numpy(np.array(x_T, dtype=np.float64) * float(scheduler.init_noise_sigma))

    extra = {"eta": 0.0} if config.scheduler == "DDIMScheduler" else {}
    for timestep in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, timestep)
        out = model(x_in, timestep)
        x = scheduler.step(out, timestep, x, **extra).prev_sample
    if x.dtype != torch.float64:
        raise RuntimeError(f"{config.label}: scheduler returned {x.dtype}, expected float64")
    return {"x": x.numpy(), "nfe": calls[0], "t_start": t_start, "end": end, "grid": np.asarray(grid),
            "steps": steps}


_FUNCTIONS = {}


def _oracle_functions(mixture, schedule):
    """Jitted exact eps(y, sigma_ve) and eps(x, t), built once per (mixture, schedule) pair."""
    key = (id(mixture), id(schedule))
    if key not in _FUNCTIONS:
        _FUNCTIONS[key] = (mixture, schedule, jax.jit(mixture.eps_ve),
                           jax.jit(lambda x, t: mixture.eps(x, t, schedule)))
    return _FUNCTIONS[key][2:]


def _vp_end(config: DiffusersConfig, scheduler, n_train):
    """Where a VP scheduler's last step lands: sigma = 0 ("zero") or a dpmjax time."""
    cfg = scheduler.config
    if config.scheduler in ("DDIMScheduler", "PNDMScheduler"):
        return "zero" if cfg.set_alpha_to_one else 1.0 / n_train
    return "zero" if cfg.get("final_sigmas_type", "zero") == "zero" else 1.0 / n_train
