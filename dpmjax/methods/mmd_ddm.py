"""MMD-DDM (Aiello, Valsesia, Magli 2023, "Fast Inference in Denoising Diffusion Models via MMD Finetuning").

Fix a budget of T' sampling steps. Finetune the whole network so that its T'-step sampler's outputs match the
data in a frozen feature space phi, by backpropagating through all T' steps:

    x_hat = S_{T'}(x_T; theta),  x_T ~ N(0, I)                          (DDIM in the paper; any dpmjax solver)
    L(theta) = MMD_u^2(phi(x_real), phi(x_hat))                          (paper eq. 5-6, unbiased estimator)
    k(a, b) = (a.b / d + 1)^3                                            (KID's cubic polynomial kernel)

with a real batch and a generated batch of the same size m (``data.batch_size``), Adam, gradient clipping. The
sampler runs inside the jitted update (``dpmjax.samplers.sample`` on a params-as-arguments model), with
``jax.checkpoint`` on each solver step (``method.remat``) so backprop stores the solver state per step, not the
network's activations. The finetuned model is meant for that T'-step sampler: the output workdir's ``sample``
section is set to it (``dpmjax sample --workdir OUT`` uses it).

Feature networks (``dpmjax.metrics.features``): ``classifier:DATASET[:SEED]`` or ``inception``. The paper's
caveat -- optimising an MMD and scoring FID in the same Inception space games the metric -- is why the
default finetunes in the features of a classifier trained with seed 1 while ``dpmjax eval`` / the experiment
score in the seed-0 classifier's (another network, a feature space the finetuning never saw).

Choices where the paper is silent or its code is specific (written down, overridable in the config):
  * the time grid: ``method.spacing`` (default "time_uniform": T' steps from t = 1, pure noise, to the end).
    The official code (ermongroup DDIM, skip = 1000 // T') starts at timestep (T' - 1) * skip, not at pure
    noise; "leading" is the closest dpmjax spacing;
  * features in float32 (the official code casts CIFAR features to float64; under JAX's default float32 the
    kernel sums stay well within float32 range for 128-2048-d features at m = 64);
  * Adam learning rate and clip: the paper's 5e-6 and 0.5 are for a 36M-parameter CIFAR-10 UNet; the digits
    config uses a larger rate for its small network (``configs/methods/mmd_ddm.py``);
  * a class-conditional teacher is finetuned on the real batch's labels (x_hat_i generated for label y_i);
  * ``method.normalize_features`` (default True): both feature batches are divided by the RMS of the real
    batch's features (``feature_scale``), so the cubic kernel stays O(1) for feature networks whose outputs
    are far from Inception's pool3 scale; False is the paper's raw kernel (the CIFAR-10 config).

config.method: steps (T'), solver, spacing, solver_options (dict), features (spec), kernel ("polynomial" or
"rbf"), kernel_options (dict), remat (bool), normalize_features (bool).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpmjax.methods.base import Method, Program, StudentState, Teacher, method_settings
from dpmjax.metrics.features import check_input_range, feature_network, parse_spec
from dpmjax.metrics.mmd import KERNELS, kernel_fn, mmd2_unbiased
from dpmjax.samplers import SOLVERS
from dpmjax.samplers.driver import plan, sample
from dpmjax.train import optim
from dpmjax.train.state import ema_decay_at, ema_update

__all__ = ["METHOD", "MMDState", "build", "validate", "mmd_loss", "sampler_timesteps"]

DEFAULTS = dict(steps=4, solver="ddim", spacing="time_uniform", solver_options={}, features="classifier:digits:1",
                kernel="polynomial", kernel_options={}, remat=True, normalize_features=True)

MMDState = StudentState  # params, EMA and optimizer state of the finetuned network


def _settings(config) -> dict:
    return method_settings(config, DEFAULTS)


def sampler_timesteps(config, teacher: Teacher) -> np.ndarray:
    """The T'-step sampler's time grid (float64, endpoints included) for the teacher's schedule."""
    m = _settings(config)
    p = plan(teacher.schedule, m["solver"], nfe=int(m["steps"]), spacing=m["spacing"], **dict(m["solver_options"]))
    return np.asarray(p.grid["t"], np.float64)


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting: T', the solver and its options on the teacher's schedule (a T' the sampler
    cannot run), the kernel, the feature network (spec, image shape, input range), the batch (m >= 2)."""
    m = _settings(config)
    unknown = sorted(set(m) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown mmd_ddm settings {unknown}; known: {sorted(DEFAULTS)}")
    steps = m["steps"]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"config.method.steps (T') must be a positive integer, got {steps!r}")
    if m["solver"] not in SOLVERS:
        raise ValueError(f"config.method.solver must be a registered solver, got {m['solver']!r}; choose one of "
                         f"{sorted(SOLVERS)}")
    if SOLVERS[m["solver"]].adaptive:
        raise ValueError(f"config.method.solver {m['solver']!r} is adaptive: MMD-DDM needs a fixed budget of T' steps")
    try:
        sampler_timesteps(config, teacher)
    except ValueError as err:
        raise ValueError(f"config.method: the {m['solver']} sampler cannot run T'={steps} steps on the teacher's "
                         f"schedule: {err}") from None
    if m["kernel"] not in KERNELS:
        raise ValueError(f"config.method.kernel must be one of {KERNELS}, got {m['kernel']!r}")
    for flag in ("remat", "normalize_features"):
        if not isinstance(m[flag], bool):
            raise ValueError(f"config.method.{flag} must be True or False, got {m[flag]!r}")
    parse_spec(m["features"])
    batch = config.data.batch_size
    if batch < 2:
        raise ValueError(f"config.data.batch_size must be >= 2 (the unbiased MMD^2 needs two rows a side), got {batch}")


def mmd_loss(features_real, features_fake, kernel="polynomial", **kernel_options):
    """MMD_u^2 between the real and generated feature batches (``dpmjax.metrics.mmd``)."""
    return mmd2_unbiased(features_real, features_fake, kernel_fn(kernel, **kernel_options))


def feature_scale(features_real):
    """s = RMS of the real batch's feature entries (no gradient): features / s have entries of order 1, so the
    cubic kernel (a.b/d + 1)^3 stays O(1) whatever the network's feature magnitudes (a classifier's penultimate
    features reach tens, where float32 sums of k ~ 1e9 would cancel). A positive rescaling of both sets: the
    estimator is still an MMD, of a kernel chosen per batch."""
    return jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(features_real))) + 1e-6)


def build(config, teacher: Teacher) -> Program:
    """The MMD-DDM program: init copies the teacher, update is one MMD step through the T'-step sampler."""
    m = _settings(config)
    net = feature_network(m["features"], image_shape=teacher.image_shape)
    check_input_range(net)
    apply_fn = teacher.apply_fn()
    timesteps = sampler_timesteps(config, teacher)
    schedule, prediction = teacher.schedule, teacher.prediction
    tx = optim.make_optimizer(total_steps=int(config.train.num_steps), **config.optim.to_dict())
    ema_decay = float(config.train.get("ema_decay", 0.0))
    conditional = teacher.num_classes is not None
    kernel = kernel_fn(m["kernel"], **dict(m["kernel_options"]))
    solver_options = dict(m["solver_options"])

    def init(frozen, key):
        params = jax.tree.map(jnp.copy, frozen["teacher"])
        return MMDState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                        opt_state=tx.init(params))

    def generate(params, x_T, key, labels):
        cond = {"y": labels} if conditional else {}
        return sample(lambda x, t: apply_fn(params, x, t, **cond), x_T, schedule=schedule, solver=m["solver"],
                      timesteps=timesteps, prediction=prediction, key=key, remat=m["remat"], **solver_options)

    def update(state: MMDState, batch, frozen, key):
        real = batch["image"]
        noise_key, solver_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, real.shape, real.dtype)
        features_real = net.apply(frozen["features"], real)
        scale = feature_scale(features_real) if m["normalize_features"] else jnp.ones((), features_real.dtype)

        def loss_fn(params):
            fake = generate(params, x_T, solver_key, batch.get("label"))
            return mmd2_unbiased(features_real / scale, net.apply(frozen["features"], fake) / scale, kernel)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        params, opt_state = optim.optimizer_step(tx, grads, state.opt_state, state.params)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
        return MMDState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), {
            "mmd2": loss, "grad_norm": optax.tree.norm(grads)}

    def student(state: MMDState, use_ema: bool):
        return state.ema_params if use_ema else state.params

    frozen = {"teacher": teacher.params, "features": net.params}
    nfe = int(m["steps"])
    output = {"sample": {"solver": m["solver"], "nfe": nfe, "spacing": m["spacing"]}}
    return Program(init=init, update=update, frozen=frozen, student=student, metric_names=("mmd2", "grad_norm"),
                   output=output, needs_data=True)


METHOD = Method(name="mmd_ddm", build=build, validate=validate,
                doc="MMD-DDM: finetune for a T'-step sampler by backprop of an MMD in a frozen feature space")
