"""dpmjax: fast diffusion-model samplers, gradients through sampling, and training, in JAX/Flax."""
from dpmjax import oracle, parameterization, schedules  # noqa: F401
from dpmjax.samplers import SOLVERS, make_param_sampler, make_sampler, sample  # noqa: F401
from dpmjax.schedules import CosineVP, DiscreteVP, FlowMatching, LinearVP, time_grid  # noqa: F401

__version__ = "0.1.0"
