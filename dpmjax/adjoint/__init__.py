"""AdjointDPM: gradients of a loss on generated samples w.r.t. x_T, conditioning and model params.

``value_and_grad_through_sampling`` is the entry point; ``generate`` the differentiable sampler under it;
``rho_ode`` the probability-flow ODE in exponential-integrator variables (y = x/alpha, rho = sigma/alpha).
"""
from dpmjax.adjoint import rho_ode  # noqa: F401
from dpmjax.adjoint.adjoint_dpm import INPUTS, METHODS, generate, value_and_grad_through_sampling  # noqa: F401

__all__ = ["METHODS", "INPUTS", "generate", "value_and_grad_through_sampling", "rho_ode"]
