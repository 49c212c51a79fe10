"""The compiled programs of the co-serving engine: one fixed-shape batch of R rows per iteration.

FlexLLM (Oliaro et al., NSDI 2026, arXiv 2402.18789) co-serves inference and PEFT finetuning on the same weights
by fusing inference tokens and finetuning tokens into one iteration. For a diffusion model the fusion is simpler:
a denoiser call for a sampling request at (x_t, t, y) and one for a LoRA training example (noised data x_t, t, y)
are the same network call, so a training example can take a *row* that the sampling batch leaves free. Here it
does, in the same compiled iteration, though as a second batched call beside the sampling call (see "Training
rows" below for why).

Row layout (every array has a leading axis of R rows, fixed at engine start, so nothing recompiles):

    kind      [R] int32    FREE (0), SAMPLING (1) or TRAINING (2: lent to a finetuning example this iteration)
    slot      [R] int32    the adapter slot the row's network uses (0 = the base network, see below)
    x         [R, H, W, C] a sampling row's current x_{t_i}
    history   [R, 2, H, W, C] the multistep ring buffer of model outputs (DPM-Solver++(2M)); DDIM ignores it
    times     [R, N_max + 1] the row's own decreasing time grid, padded with its last time (data, never a constant)
    step      [R] int32    the row's step index i into its grid
    num_steps [R] int32    the row's number of grid intervals (= its NFE)
    solver    [R] int32    index into ``ROW_SOLVERS``
    label     [R] int32    class label (class-conditional networks; 0 otherwise)

Continuous batching: the host writes a joining request's rows through an ``Admission`` (a row mask and full-size
arrays, merged inside the program with ``jnp.where``), so requests join and leave at any step without a new shape.
Each row advances by one solver step per iteration with its own grid and step index: the per-step functions of
the library's solvers are vmapped over rows (``dpmjax.samplers.ddim`` for DDIM, ``multistep_weights`` of
``dpmjax.samplers.dpm_solver`` for DPM-Solver++(2M)), and a row's result is the ``jnp.where`` of the solvers'
updates on its solver index (a few elementwise flops; the network call dominates).

Adapters: per-row selection from K stacked slots. Slot 0 is the zero adapter (the base network), slot
``TRAIN_SLOT`` = 1 the adapter being trained, slots 2..K-1 finished adapters loaded by name. Every slot is padded
to one maximal rank (zero rows of A and B add nothing to A^T B and stay zero under Adam, whose update of a zero
gradient is zero) and carries its own scale alpha / r, so adapters of any rank <= max rank share one shape. The
network of slot k is W_0 + scale_k A_k^T B_k (``dpmjax.nn.lora.lora_delta``, Hu et al. 2021 eq. 3); each row
gathers its slot's merged weights under ``vmap`` (XLA runs per-row weights as grouped convolutions); while no
sampling row uses an adapter, a ``lax.switch`` in the same program runs the plain batched base network instead.
Chosen
over one adapter per batch because co-serving needs it: the training rows use the adapter being trained while
most sampling rows use the base network, in the same call. The cost is R copies of the adapted kernels in the
batched call, fine for the small networks this serves on a CPU; a large network would keep the low-rank path
unmerged inside its layers (x W_0 + scale x A^T B per row), which needs LoRA-aware modules in ``dpmjax.nn``.

Training rows: a job's examples take rows that sampling leaves free (the host marks them TRAINING, so no request
is admitted there) and go through the trained adapter's merged network as one batched call over a fixed bucket of
T training slots (T <= R, ``num_train_rows``). The loss is the denoising loss (``dpmjax.train.losses``) of the used
slots only (a ``jnp.where`` mask, so a NaN anywhere else cannot reach it); the gradient is taken w.r.t. the
training slot's adapter alone (base params and other slots are arguments, not differentiated). The sampling call
carries no gradient. Why two calls in the one program rather than one call with per-row weights: differentiating
through per-row weights makes XLA:CPU compute the weight gradient of R grouped convolutions, measured ~4 s per
iteration for the 10k-parameter digits UNet at R = 32 (against ~30 ms for this form and ~10 ms for a sampling-only
iteration); LoRA-aware layers (the low-rank path unmerged, per row) would make them one call. Gradients accumulate
over iterations until a job's batch is full (``apply_update`` then runs one Adam step), so a finetuning step always
sees ``batch_size`` examples however the rows were split under load.

Params (base, slots, the trained adapter, Adam's moments), the learning rate and keys are arguments of every
jitted function; ``trace_count()`` counts traces with a Python side effect inside them and ``compile_count``
the compiled executables (also recompilations without a retrace), so a test can assert that requests joining at
different steps never compile again.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpmjax import parameterization
from dpmjax.nn import network_time
from dpmjax.nn.lora import merge_scaled
from dpmjax.samplers import ddim, dpm_solver
from dpmjax.samplers.base import ModelEval, at_time, combine_lags, expand_like, ring_slot
from dpmjax.train import losses
from dpmjax.train.optim import optimizer_step

__all__ = ["ROW_SOLVERS", "FREE", "SAMPLING", "TRAINING", "TRAIN_SLOT", "Rows", "Admission", "TrainRows",
           "Programs", "make_programs", "merge_scaled", "empty_rows", "trace_count", "compile_count", "HISTORY"]

ROW_SOLVERS = ("ddim", "dpmpp_2m")   # solvers whose single step runs per row (others are refused with a 4xx)
HISTORY = 2                           # ring-buffer length: DPM-Solver++(2M) keeps its last two x0-predictions
FREE, SAMPLING, TRAINING = 0, 1, 2
TRAIN_SLOT = 1

_TRACES = {"count": 0}


def trace_count() -> int:
    """How many times any engine program has been traced (each trace is one compilation)."""
    return _TRACES["count"]


def compile_count(programs: "Programs") -> int:
    """Executables compiled so far by ``programs``' jitted functions (jax's per-function cache size).

    This also counts recompilations without a new trace, e.g. when arguments arrive with another placement
    (an uncommitted array where a committed one was seen before): the engine therefore puts every argument on
    its one device explicitly."""
    return sum(fn._cache_size() for fn in programs)  # noqa: SLF001 - as dpmjax.samplers.driver's cache_size


def _traced():
    _TRACES["count"] += 1  # Python side effect: runs once per trace, never when a compiled program runs


class Rows(NamedTuple):
    """Per-row sampling state, on the device between iterations (shapes fixed at engine start)."""

    kind: jax.Array       # [R] int32
    slot: jax.Array       # [R] int32
    x: jax.Array          # [R, H, W, C]
    history: jax.Array    # [R, HISTORY, H, W, C]
    times: jax.Array      # [R, N_max + 1] float32
    step: jax.Array       # [R] int32
    num_steps: jax.Array  # [R] int32
    solver: jax.Array     # [R] int32
    label: jax.Array      # [R] int32


class Admission(NamedTuple):
    """Rows written by the host this iteration: where ``mask`` holds, the row starts (step 0, empty history)."""

    mask: jax.Array       # [R] bool
    kind: jax.Array       # [R] int32 (the new kind of every row, admitted or not: the host's row table)
    slot: jax.Array       # [R] int32
    x: jax.Array          # [R, H, W, C] x_T of admitted rows
    times: jax.Array      # [R, N_max + 1]
    num_steps: jax.Array  # [R] int32
    solver: jax.Array     # [R] int32
    label: jax.Array      # [R] int32


class TrainRows(NamedTuple):
    """This iteration's training examples: T slots (the training bucket), filled from the front."""

    images: jax.Array     # [T, H, W, C] clean images x_0 in [-1, 1] (zeros where unused)
    label: jax.Array      # [T] int32
    weight: jax.Array     # [T] float32: 1 / batch_size on used slots, 0 elsewhere


def empty_rows(num_rows: int, image_shape, max_steps: int, default_times) -> Rows:
    """All rows FREE, with a valid grid (``default_times`` [N_max + 1]) so free rows compute finite values."""
    shape = (num_rows,) + tuple(image_shape)
    zeros_i = jnp.zeros((num_rows,), jnp.int32)
    return Rows(kind=zeros_i, slot=zeros_i, x=jnp.zeros(shape, jnp.float32),
                history=jnp.zeros((num_rows, HISTORY) + tuple(image_shape), jnp.float32),
                times=jnp.broadcast_to(jnp.asarray(default_times, jnp.float32), (num_rows, max_steps + 1)),
                step=zeros_i, num_steps=jnp.ones((num_rows,), jnp.int32), solver=zeros_i, label=zeros_i)


def _ddim_row(schedule):
    """One DDIM (eta = 0) step of one row: the library solver's own ``update`` on a batch of one."""
    solver = ddim.make_ddim(schedule, 1)

    def step(x, history, i, num_steps, times, out):
        state = ddim.DDIMState(x=x[None], key=jax.random.key(0))
        new = solver.update(state, i, {"t": times}, ModelEval(eps=out.eps[None], x0=out.x0[None]))
        return new.x[0], history

    return step


def _dpmpp_2m_row(schedule):
    """One DPM-Solver++(2M) step of one row, with the row's own NFE (the library's ``make_multistep`` takes the
    step count as a Python int for its lower-order-final rule; here it is the row's traced ``num_steps``).

    Same math as ``dpm_solver.make_multistep(order=2, data=True)``: write m_i = x0-prediction into the ring,
    order min(2, i + 1), lowered to min(order, N - i) when N < ``LOWER_ORDER_FINAL_BELOW``, then
    x_{i+1} = (sigma_{i+1}/sigma_i) x_i + sum_k w_k m_{i-k} with ``multistep_weights`` (Lu et al. 2022b, Alg. 2)."""
    order = HISTORY

    def step(x, history, i, num_steps, times, out):
        history = jax.lax.dynamic_update_index_in_dim(history, out.x0, ring_slot(i, order), 0)
        lambdas = jnp.stack([at_time(schedule, times[jnp.maximum(i - k, 0)]).lam for k in range(order)])
        s, t = at_time(schedule, times[i]), at_time(schedule, times[i + 1])
        step_order = jnp.minimum(order, i + 1)
        lowered = jnp.minimum(step_order, num_steps - i)
        step_order = jnp.where(num_steps < dpm_solver.LOWER_ORDER_FINAL_BELOW, lowered, step_order)
        ratio, w = dpm_solver.multistep_weights(lambdas, s, t, step_order, order, data=True, solver_type="dpmsolver")
        x_next = expand_like(ratio, x) * x + combine_lags(history, w, i)
        return x_next, history

    return step


class Programs(NamedTuple):
    """The engine's jitted functions (each compiles once for the engine's shapes)."""

    sample_step: Callable   # (base, stack, scales, rows, admission) -> rows
    coserve_step: Callable  # (base, stack, scales, train_adapter, accum, rows, admission, train, key)
    #                         -> (rows, accum, loss_sum [], row_losses [T])
    apply_update: Callable  # (train_adapter, opt_state, accum, lr) -> (train_adapter, opt_state, accum, finite)
    init_opt: Callable      # train_adapter -> Adam state
    noise: Callable         # (key, R) ... -> [R, H, W, C] x_T of image j = normal(fold_in(key, j))


def make_programs(model, schedule, prediction: str, num_rows: int, image_shape, *, conditional: bool,
                  num_train_rows: int | None = None) -> Programs:
    """The per-iteration programs for ``model`` (a Flax module with the dpmjax call signature): R = ``num_rows``
    sampling rows, T = ``num_train_rows`` (default R) training slots."""
    num_train_rows = num_rows if num_train_rows is None else num_train_rows
    parameterization.check_prediction(prediction)
    row_steps = {"ddim": _ddim_row(schedule), "dpmpp_2m": _dpmpp_2m_row(schedule)}
    row_steps = [row_steps[name] for name in ROW_SOLVERS]
    adam = optax.chain(optax.scale_by_adam(), optax.scale(-1.0))

    def network(base, stack, scales, kind, slot, x, t, label):
        """Every SAMPLING row through the network of its slot (other rows' outputs are not used); t [R].

        When no sampling row uses an adapter (the common case) a ``lax.switch`` takes the plain batched call of
        the base network instead of per-row weights, and with no sampling row at all it skips the call: the same
        program (nothing recompiles), and XLA runs only the branch taken."""
        def per_row_weights():
            merged = jax.vmap(lambda adapters, scale: merge_scaled(base, adapters, scale))(stack, scales)

            def one_row(slot_r, x_r, t_r, y_r):
                variables = jax.tree.map(lambda w: w[slot_r], merged)
                y = y_r[None] if conditional else None
                return model.apply(variables, x_r[None], network_time(schedule, t_r[None]), y=y, train=False)[0]

            return jax.vmap(one_row)(slot, x, t, label).astype(x.dtype)

        def base_only():
            y = label if conditional else None
            return model.apply(base, x, network_time(schedule, t), y=y, train=False).astype(x.dtype)

        def no_sampling_rows():  # a training-only iteration: the sampling call is skipped
            return jnp.zeros_like(x)

        branch = jnp.where(jnp.any(kind == SAMPLING), jnp.where(jnp.any((kind == SAMPLING) & (slot != 0)), 2, 1), 0)
        return jax.lax.switch(branch, [no_sampling_rows, base_only, per_row_weights])

    def admit(rows: Rows, admission: Admission) -> Rows:
        m = admission.mask
        return Rows(kind=admission.kind, slot=jnp.where(m, admission.slot, rows.slot),
                    x=jnp.where(expand_like(m, rows.x), admission.x, rows.x),
                    history=jnp.where(expand_like(m, rows.history), 0.0, rows.history),
                    times=jnp.where(m[:, None], admission.times, rows.times),
                    step=jnp.where(m, 0, rows.step), num_steps=jnp.where(m, admission.num_steps, rows.num_steps),
                    solver=jnp.where(m, admission.solver, rows.solver),
                    label=jnp.where(m, admission.label, rows.label))

    def sampling_times(rows: Rows):
        step = jnp.minimum(rows.step, rows.num_steps - 1)
        return jnp.take_along_axis(rows.times, step[:, None], axis=1)[:, 0]

    def advance(rows: Rows, x_eval, t_eval, output) -> Rows:
        """One solver step of every SAMPLING row from the network output at (x_eval, t_eval)."""
        out = ModelEval(eps=parameterization.to_eps(output, x_eval, t_eval, schedule, prediction),
                        x0=parameterization.to_x0(output, x_eval, t_eval, schedule, prediction))
        step = jnp.minimum(rows.step, rows.num_steps - 1)

        def one_row(x, history, i, n, times, eps, x0, solver):
            results = [f(x, history, i, n, times, ModelEval(eps=eps, x0=x0)) for f in row_steps]
            x_next, hist_next = results[0]
            for k, (x_k, h_k) in enumerate(results[1:], start=1):
                x_next = jnp.where(solver == k, x_k, x_next)
                hist_next = jnp.where(solver == k, h_k, hist_next)
            return x_next, hist_next

        x_next, history = jax.vmap(one_row)(rows.x, rows.history, step, rows.num_steps, rows.times, out.eps, out.x0,
                                            rows.solver)
        sampling = rows.kind == SAMPLING
        return rows._replace(x=jnp.where(expand_like(sampling, rows.x), x_next, rows.x),
                             history=jnp.where(expand_like(sampling, rows.history), history, rows.history),
                             step=jnp.where(sampling, rows.step + 1, rows.step))

    @jax.jit
    def sample_step(base, stack, scales, rows, admission):
        _traced()
        rows = admit(rows, admission)
        t = sampling_times(rows)
        output = network(base, stack, scales, rows.kind, rows.slot, rows.x, t, rows.label)
        return advance(rows, rows.x, t, output)

    @jax.jit
    def coserve_step(base, stack, scales, train_adapter, accum, rows, admission, train: TrainRows, key):
        _traced()
        rows = admit(rows, admission)
        k_t, k_noise = jax.random.split(key)
        t_train = losses.sample_times(k_t, num_train_rows, schedule, jnp.float32)
        noise = jax.random.normal(k_noise, train.images.shape, jnp.float32)
        x_train = losses.diffuse(train.images, t_train, noise, schedule)
        target = losses.target_for(train.images, noise, t_train, schedule, prediction)
        used = train.weight > 0
        t_sampling = sampling_times(rows)
        # sampling rows: their slots' networks, no gradient; training examples: the trained adapter's merged
        # network as one batched call over the T training slots (gradient w.r.t. the adapter only, loss masked)
        output = network(base, stack, scales, rows.kind, rows.slot, rows.x, t_sampling, rows.label)

        def loss_fn(adapter):
            variables = merge_scaled(base, adapter, scales[TRAIN_SLOT])
            y = train.label if conditional else None
            train_output = model.apply(variables, x_train, network_time(schedule, t_train), y=y, train=False)
            row_losses = jnp.mean((train_output.astype(target.dtype) - target) ** 2,
                                  axis=tuple(range(1, target.ndim)))
            row_losses = jnp.where(used, row_losses, 0.0)
            return jnp.sum(row_losses * train.weight), row_losses

        (loss_sum, row_losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_adapter)
        accum = jax.tree.map(jnp.add, accum, grads)
        rows = advance(rows, rows.x, t_sampling, output)
        return rows, accum, loss_sum, row_losses

    @jax.jit
    def apply_update(train_adapter, opt_state, accum, lr):
        """One Adam step (Kingma & Ba 2015) of the trained adapter on the accumulated batch gradient."""
        _traced()
        # optimizer_step: the project's update under standard promotion (optax's bias correction is float ** int32);
        # the learning rate is an argument (a per-job value, not a trace constant), applied after Adam's scaling
        scaled, opt_state = optimizer_step(adam, accum, opt_state, jax.tree.map(jnp.zeros_like, train_adapter))
        train_adapter = jax.tree.map(lambda p, u: p + lr * u, train_adapter, scaled)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(train_adapter)]))
        return train_adapter, opt_state, jax.tree.map(jnp.zeros_like, accum), finite

    @jax.jit
    def init_opt(train_adapter):
        _traced()
        return adam.init(train_adapter)

    @jax.jit
    def noise(key):
        _traced()
        return jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), tuple(image_shape), jnp.float32))(
            jnp.arange(num_rows))

    return Programs(sample_step=sample_step, coserve_step=coserve_step, apply_update=apply_update,
                    init_opt=init_opt, noise=noise)
