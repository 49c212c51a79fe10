"""Training-free samplers: every solver is a pure init/query/update plan over a time grid passed as data, run by
one ``lax.scan``.

``SOLVERS`` maps a name to its entry (``registry.py``); ``sample`` is the closure-form entry,
``make_param_sampler`` / ``make_sampler`` the compiled ones (``driver.py``). ``policy`` runs the stochastic DDIM
step as a Gaussian policy with exact per-step log-probabilities (reward finetuning: DDPO, PRDP).
"""
from dpmjax.samplers.base import ModelEval, Solver, SolverEntry  # noqa: F401
from dpmjax.samplers.driver import Plan, SampleInfo, SamplingError, make_evaluate, make_param_sampler, make_sampler, \
    plan, sample  # noqa: F401
from dpmjax.samplers.registry import SOLVERS  # noqa: F401

__all__ = ["SOLVERS", "Solver", "SolverEntry", "ModelEval", "Plan", "SampleInfo", "SamplingError", "sample",
           "make_sampler", "make_param_sampler", "make_evaluate", "plan"]
