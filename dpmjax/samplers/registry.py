"""``SOLVERS``: every registered solver as an explicit entry (no import side effects, no ``hasattr`` dispatch).

Each entry names its factory, its public options, how many grid intervals an NFE buys, its minimum NFE, whether
it needs a PRNG key, and its optional host-side hooks (a grid builder, a ``prepare`` step that turns options and
concrete times into grid data). ``dpmjax solvers`` prints this table.
"""
from __future__ import annotations

from dpmjax.samplers import adaptive, dc_solver, ddim, dpm_solver, dpm_solver_singlestep, dpm_solver_v3, karras, \
    pndm, renoise, sde_dpmpp, time_shift, unipc, usf
from dpmjax.samplers.base import SolverEntry

__all__ = ["SOLVERS"]

_MULTISTEP_OPTIONS = ("solver_type", "lower_order_final", "exact_third_order")


def _always(options: dict) -> bool:
    return True


def _multistep(name: str, order: int, data: bool) -> SolverEntry:
    def make(schedule, num_steps, **options):
        return dpm_solver.make_multistep(schedule, num_steps, order=order, data=data, name=name, **options)
    kind = "DPM-Solver++" if data else "DPM-Solver"
    return SolverEntry(name=name, make=make, options=_MULTISTEP_OPTIONS, takes_tail_steps=True,
                       doc=f"multistep {kind}({order}M) (Lu et al. 2022)")


def _singlestep(name: str, order: int, data: bool) -> SolverEntry:
    def make(schedule, num_steps, **options):
        return dpm_solver_singlestep.make_singlestep(schedule, num_steps, order=order, data=data, name=name,
                                                     **options)
    kind = "DPM-Solver++" if data else "DPM-Solver"
    return SolverEntry(name=name, make=make, options=("solver_type",),
                       grid=dpm_solver_singlestep.singlestep_grid(order),
                       doc=f"singlestep {kind}-{order} with the official order mixing")


def _time_shift(name: str, make, options=("window", "cutoff"), **fields) -> SolverEntry:
    return SolverEntry(name=name, make=make, options=options, prepare=time_shift.prepare_time_shift(name),
                       doc="Time-Shift sampler (Li et al. 2024): per-sample shifted times", **fields)


SOLVERS: dict[str, SolverEntry] = {entry.name: entry for entry in (
    SolverEntry(name="ddim", make=ddim.make_ddim, options=("eta",), needs_key=ddim.ddim_needs_key,
                doc="DDIM (eta = 0 deterministic; eta > 0 stochastic)"),
    SolverEntry(name="ddpm", make=ddim.make_ddpm, needs_key=_always, doc="DDPM ancestral sampling (DDIM, eta = 1)"),
    _multistep("dpm_solver_2m", 2, data=False),
    _multistep("dpm_solver_3m", 3, data=False),
    _multistep("dpmpp_2m", 2, data=True),
    _multistep("dpmpp_3m", 3, data=True),
    _singlestep("dpm_solver_1", 1, data=False),
    _singlestep("dpm_solver_2", 2, data=False),
    _singlestep("dpm_solver_3", 3, data=False),
    _singlestep("dpmpp_2s", 2, data=True),
    SolverEntry(name="dpm_solver_adaptive", make=adaptive.make_adaptive, adaptive=True, takes_tail_steps=True,
                options=("order", "algorithm", "solver_type", "rtol", "atol", "h_init", "theta", "t_err", "max_nfe"),
                steps_for_nfe=lambda nfe, **_: 1, prepare=adaptive.prepare_adaptive,
                doc="adaptive step-size DPM-Solver-12/23 (a while loop; NFE decided at run time)"),
    SolverEntry(name="sde_dpmpp_2m", make=sde_dpmpp.make_sde_dpmpp_2m,
                options=("solver_type", "lower_order_final"), needs_key=_always, takes_tail_steps=True,
                doc="SDE-DPM-Solver++(2M) (stochastic)"),
    SolverEntry(name="unipc", make=unipc.make_unipc,
                options=("order", "variant", "predict_x0", "use_corrector", "lower_order_final", "disable_corrector"),
                takes_tail_steps=True, doc="UniPC predictor-corrector (Zhao et al. 2023)"),
    SolverEntry(name="dc_solver", make=dc_solver.make_dc_solver,
                options=("ratios", "dc_order", "order", "variant", "predict_x0", "use_corrector", "lower_order_final"),
                prepare=dc_solver.prepare_dc, prepared_options=("ratios",), takes_tail_steps=True,
                doc="DC-Solver: UniPC with dynamic compensation (ratios as grid data)"),
    SolverEntry(name="dpm_solver_v3", make=dpm_solver_v3.make_dpm_solver_v3, options=dpm_solver_v3.OPTIONS,
                grid=dpm_solver_v3.grid_dpm_solver_v3, prepare=dpm_solver_v3.prepare_dpm_solver_v3,
                prepared_options=dpm_solver_v3.PREPARED_OPTIONS,
                doc="DPM-Solver-v3 with empirical model statistics (ems=...)"),
    SolverEntry(name="usf", make=usf.make_usf, options=("spec", "arrays", "afs"),
                steps_for_nfe=usf.usf_steps_for_nfe, grid=usf.grid_usf, prepare=usf.prepare_usf,
                prepared_options=("arrays",),
                doc="USF: a searched solver schedule (spec=USFSpec)"),
    SolverEntry(name="pndm", make=pndm.make_pndm, steps_for_nfe=pndm.pndm_steps_for_nfe,
                min_nfe=lambda **_: 4 * pndm.RUNGE_KUTTA_STEPS,
                doc="F-PNDM (Liu et al. 2022): 3 pseudo-RK4 steps, then AB4"),
    SolverEntry(name="s_pndm", make=pndm.make_s_pndm, steps_for_nfe=lambda nfe, **_: nfe - 1, min_nfe=lambda **_: 2,
                doc="S-PNDM: pseudo improved Euler, then AB2"),
    SolverEntry(name="plms", make=pndm.make_plms, steps_for_nfe=lambda nfe, **_: nfe - 1, min_nfe=lambda **_: 2,
                doc="PLMS (diffusers' PNDMScheduler with skip_prk_steps)"),
    SolverEntry(name="renoise", make=renoise.make_renoise, needs_key=renoise.renoise_needs_key,
                doc="x0 re-noise sampling of few-step distilled generators (DMD2, consistency models)"),
    SolverEntry(name="euler", make=karras.make_euler, doc="Euler in sigma_ve (Karras et al. 2022)"),
    SolverEntry(name="heun", make=karras.make_heun, steps_for_nfe=karras.heun_steps_for_nfe, min_nfe=lambda **_: 2,
                doc="Heun in sigma_ve (Karras et al. 2022): 2 calls per step"),
    _time_shift("ts_ddim", time_shift.make_ts_ddim),
    _time_shift("ts_pndm", time_shift.make_ts_pndm, steps_for_nfe=pndm.pndm_steps_for_nfe,
                min_nfe=lambda **_: 4 * pndm.RUNGE_KUTTA_STEPS),
    _time_shift("ts_s_pndm", time_shift.make_ts_s_pndm, steps_for_nfe=lambda nfe, **_: nfe - 1,
                min_nfe=lambda **_: 2),
    _time_shift("ts_dpm_solver", time_shift.make_ts_dpm_solver,
                options=("window", "cutoff", "order", "lower_order_final"), takes_tail_steps=True),
)}
