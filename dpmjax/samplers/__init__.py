"""Training-free samplers: every solver is a pure init/query/update plan run by one ``lax.scan``.

``SOLVERS`` maps a name to its factory; ``sample`` is the public entry (see ``driver.py``).
"""
from dpmjax.samplers.base import SOLVERS, ModelEval, Solver, register  # noqa: F401
from dpmjax.samplers import ddim, dpm_solver  # noqa: F401  (registration side effects)
from dpmjax.samplers import unipc  # noqa: F401  (registration side effects)
from dpmjax.samplers import karras, pndm  # noqa: F401  (registration side effects)
from dpmjax.samplers import adaptive, dpm_solver_singlestep, sde_dpmpp  # noqa: F401  (registration side effects)
from dpmjax.samplers import dpm_solver_v3  # noqa: F401  (registration side effects)
from dpmjax.samplers import dc_solver, time_shift, usf  # noqa: F401  (registration side effects)
from dpmjax.samplers.driver import make_param_sampler, make_sampler, plan, sample  # noqa: F401

__all__ = ["SOLVERS", "Solver", "ModelEval", "register", "sample", "make_sampler", "make_param_sampler", "plan"]
