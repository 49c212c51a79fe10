"""The ``dpmjax`` command line: the only module that parses flags.

    dpmjax quickstart [--workdir runs/digits]
        The main job (also what plain ``dpmjax`` runs): train configs/digits.py, sample it with dpmpp_2m at
        5/10/20 NFE, write a sample grid and a quality table (classifier Frechet distance, and 1000-step DDPM
        beside the real-data floor). ``--config configs/digits.py:runlocal --num 32`` is a seconds-long smoke run.
    dpmjax train --config configs/NAME.py[:VARIANT] --workdir DIR [--config.train.num_steps=N ...]
    dpmjax sample --workdir DIR [--solver S --nfe N --num M --labels 3 --guidance-scale 2 --out FILE.npz]
        Defaults come from the workdir's config.sample (solver, nfe, spacing, guidance_scale, num); flags
        override them. Several --solver/--nfe values write one file each. npz + PNG grid per file.
    dpmjax sample [--oracle ring|mix64] [--solvers a,b] [--nfe 5,10,20]       (no --workdir: the oracle)
        Sample the Gaussian-mixture oracle (exact score) with each solver and NFE; print the error against
        the exact probability-flow ODE solution.
    dpmjax eval --workdir DIR [--solvers a,b --nfe 5,10,20 --num M]           (CSV + plot)
    dpmjax ems --workdir DIR                                                    (DPM-Solver-v3 statistics)
    dpmjax solvers
        List the registered solvers and their options.
    dpmjax convert --from-diffusers DIR --out DIR [--scheduler-config FILE] [--overwrite]
        Convert a diffusers UNet2DModel folder (e.g. google/ddpm-cifar10-32) into a dpmjax checkpoint folder
        that ``sample`` / ``eval --workdir`` and ``dpmjax.workdir.load_params`` read.
    dpmjax finetune --method NAME --teacher DIR --workdir DIR [--config configs/methods/NAME.py[:VARIANT]]
        Run a finetuning / distillation / adaptation method (``dpmjax.methods``) on a trained workdir.
    dpmjax serve --workdir DIR [--host 127.0.0.1 --port 8000 --batch-rows 32 --latency-target-ms 2000 --mode coserve]
        HTTP sampling server that co-serves LoRA finetuning jobs in the same batches (``dpmjax.serve``):
        POST /sample, POST /finetune, GET /jobs/ID, GET /metrics.
    dpmjax delta prune --base DIR --finetuned DIR --p P --variant dare|dare_q|dare_q_analytic|magnitude --out DIR
        DARE / DAREx / magnitude pruning of finetuned - base (``dpmjax.methods.dare``): a sparse delta file and a
        workdir of base + pruned delta that ``sample`` / ``eval`` read.

Class-conditional workdirs (``config.model.num_classes``) sample the classes of ``--labels`` (default: every
class in turn), repeated to fill the batch, with classifier-free guidance at ``--guidance-scale`` (default
``config.sample.guidance_scale``; 1 = the conditional model alone, 0 = unconditional). ``--solver
dpm_solver_v3`` uses the statistics ``dpmjax ems`` wrote (the newest file in ``WORKDIR/ems/``, or ``--ems
FILE``); without statistics it stops with the command that computes them, and ``--ems none`` runs it on
degenerate statistics (DPM-Solver++'s form) on purpose.

Exit status: 0 done; 2 a user mistake or a failed check, reported as one line ``dpmjax: error: ...`` that
names the argument (bad flags or config overrides, a missing workdir or file, a corrupt or non-finite
checkpoint, non-finite samples, a diverged training run). Arguments are checked before any checkpoint is
restored or anything is compiled. 130: interrupted. A traceback is a bug in dpmjax; ``DPMJAX_DEBUG=1`` shows
the traceback of every error.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import os
import sys
import time

DEFAULT_SOLVERS = "ddim,dpm_solver_2m,dpm_solver_3m,dpmpp_2m,dpmpp_3m"  # oracle mode
ORACLES = ("ring", "mix64")
# jax_transfer_guard levels for implicit device -> host transfers while training. Under "disallow" (big_vision's
# setting) an implicit read of a device value (float(x), np.asarray(x): a host sync that stalls the step
# pipeline on GPU/TPU) fails, while the explicit jax.device_get the loop does at log and checkpoint steps is
# allowed; "log" lists them. Only this direction is guarded: the guard scopes the whole train() call, whose
# set-up moves Python scalars and numpy arrays to the devices implicitly (harmless, once; "disallow" for all
# directions stops it in init). On CPU device arrays live in host memory and there is nothing to catch.
TRANSFER_GUARD_LEVELS = ("allow", "log", "disallow")


class UsageError(ValueError):
    """A mistake in the command line: one line ``dpmjax: error: ...`` and exit status 2."""


class NonFiniteError(FloatingPointError):
    """Weights or generated samples with NaN/inf: exit status 2, nothing written."""


# ------------------------------------------------------------------------------------------------ parsing

class _Parser(argparse.ArgumentParser):
    """argparse whose errors raise ``UsageError`` (one line from ``main``) instead of printing usage + exit."""

    def error(self, message):
        raise UsageError(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions verbatim and appends "(default: X)" to every option that has a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _type(check, expected):
    def parse(text):
        try:
            value = check(text)
        except (ValueError, TypeError):
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = expected
    return parse


def _as_int(text, minimum):
    value = int(text)
    return value if value >= minimum else None


def _as_list(text, cast):
    items = [item.strip() for item in text.split(",")]
    if not items or any(not item for item in items):
        return None
    values = [cast(item) for item in items]
    return None if any(v is None for v in values) else values


def _as_float(text, minimum):
    value = float(text)
    return value if value >= minimum and value == value and value != float("inf") else None


positive_int = _type(lambda t: _as_int(t, 1), "a positive integer")
non_negative_int = _type(lambda t: _as_int(t, 0), "a non-negative integer")
non_negative_float = _type(lambda t: _as_float(t, 0.0), "a non-negative number")
port_number = _type(lambda t: _as_int(t, 0) if int(t) <= 65535 else None, "a port number in [0, 65535]")
nfe_list = _type(lambda t: _as_list(t, lambda s: _as_int(s, 1)), "positive integers such as 5,10,20")
name_list = _type(lambda t: _as_list(t, lambda s: s), "names such as dpmpp_2m,unipc")
label_list = _type(lambda t: _as_list(t, lambda s: _as_int(s, 0)), "class labels such as 3 or 0,1,2")


# ------------------------------------------------------------------------------------------------ checks

def _check_output_file(path: str, flag: str, suffix: str | None = None) -> str:
    """An output file we will create: its folder must exist and be writable (checked before any work)."""
    if suffix and not path.endswith(suffix):
        raise UsageError(f"{flag} {path}: the file name must end in {suffix}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory, expected a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: directory {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {parent} is not writable")
    return path


def _check_output_dir(path: str, flag: str) -> str:
    """A folder we may create (with its parents): the nearest existing ancestor must be a writable folder."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UsageError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK):
        raise UsageError(f"{flag} {path}: {ancestor} is not writable")
    return path


def _check_solvers(names, flag: str):
    import dpmjax

    for name in names:
        if name not in dpmjax.SOLVERS:
            near = difflib.get_close_matches(name, list(dpmjax.SOLVERS), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise UsageError(f"{flag}: unknown solver {name!r}{hint} (`dpmjax solvers` lists them)")
    return names


def _check_spacing(spacing: str, flag: str = "--spacing"):
    from dpmjax.schedules import SPACINGS

    if spacing not in SPACINGS:
        raise UsageError(f"{flag}: unknown spacing {spacing!r}; choose one of {SPACINGS}")
    return spacing


def _check_num_devices(num_devices):
    import jax

    if num_devices is not None and num_devices > jax.device_count():
        raise UsageError(f"--num-devices {num_devices}: only {jax.device_count()} device(s) are available")


def _workdir(workdir: str, *, denoiser: bool = False):
    """(config, checkpoint steps) of a finished workdir, reading only small files; ``denoiser``: refuse a workdir
    whose network is not a diffusion model (a VAE of latent diffusion)."""
    from dpmjax.workdir import checkpoint_steps, load_config_of

    try:
        config, steps = load_config_of(workdir), checkpoint_steps(workdir)
    except FileNotFoundError as err:
        raise UsageError(f"--workdir: {err}") from None
    if denoiser and config.model.get("kind") == "vae":
        raise UsageError(f"--workdir: {workdir} holds a VAE (config.model.kind='vae'), an autoencoder, not a "
                         "diffusion model: sample a latent workdir trained on its latents "
                         "(configs/latent_fashion_mnist.py:vae=...)")
    return config, steps


def _check_finite_params(params, workdir: str, step: int):
    import jax
    import numpy as np

    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
            raise NonFiniteError(f"checkpoint step {step} of {workdir} holds non-finite weights (NaN/inf in "
                                 f"{jax.tree_util.keystr(path)}); its samples would be NaN; nothing was sampled")


# ------------------------------------------------------------------------------------------------ sampling setup

class _Sampling:
    """Everything ``sample`` / ``eval`` / ``quickstart`` decide before restoring a checkpoint.

    Built from the workdir's config.json and the flags (which win over ``config.sample``); every check runs
    here, so a mistake costs no restore and no compile.
    """

    def __init__(self, args, config, workdir, *, solvers=None, nfes=None, num=None):
        from dpmjax.nn import build_model
        from dpmjax.schedules import schedule_from_config
        from dpmjax.workdir import sample_settings

        settings = sample_settings(config)
        self.config, self.workdir, self.settings = config, workdir, settings
        self.schedule = schedule_from_config(config.schedule)
        self.model = build_model(config.model)
        self.shape = tuple(config.data.image_shape)
        self.prediction = str(config.train.get("target", "eps"))
        self.solvers = _check_solvers(solvers or [settings["solver"]], "--solver")
        self.nfes = nfes or [settings["nfe"]]
        self.spacing = _check_spacing(getattr(args, "spacing", None) or settings["spacing"])
        self.num = num if num is not None else settings["num"]
        self.num_classes = config.model.get("num_classes")
        labels, scale = getattr(args, "labels", None), getattr(args, "guidance_scale", None)
        if self.num_classes is None:
            if labels is not None:
                raise UsageError(f"--labels: {workdir} holds an unconditional model (config.model.num_classes is "
                                 "not set); drop --labels")
            if scale is not None:
                raise UsageError(f"--guidance-scale: {workdir} holds an unconditional model (config.model."
                                 "num_classes is not set); guidance needs a class-conditional model")
            self.labels, self.guidance_scale = None, None
        else:
            bad = [v for v in labels or [] if v >= self.num_classes]
            if bad:
                raise UsageError(f"--labels: {bad[0]} is not a class of this model (classes 0..{self.num_classes - 1})")
            import numpy as np
            self.labels = np.resize(np.asarray(labels if labels else np.arange(self.num_classes), np.int32),
                                    self.num)
            self.label_pattern = list(labels) if labels else list(range(self.num_classes))
            self.guidance_scale = float(settings["guidance_scale"] if scale is None else scale)
        self.ems, self.ems_path = None, None
        ems_flag = getattr(args, "ems", None)
        if "dpm_solver_v3" in self.solvers:
            self._load_ems(ems_flag)
        elif ems_flag is not None:
            raise UsageError("--ems: statistics are used by --solver dpm_solver_v3 only")

    def _load_ems(self, flag):
        from dpmjax.workdir import load_workdir_ems

        if flag is not None and flag.lower() == "none":
            print("dpm_solver_v3: --ems none: degenerate statistics (l = 1, s = b = 0: DPM-Solver++'s form), on "
                  "purpose", flush=True)
            return
        try:
            self.ems, self.ems_path = load_workdir_ems(self.workdir, self.schedule, flag)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--ems: {err}") from None
        print(f"dpm_solver_v3: statistics {self.ems_path} (N={self.ems.num_grid} grid intervals, "
              f"K={self.ems.num_samples} samples, model {self.ems.model_id or '?'})", flush=True)

    # -- the model -------------------------------------------------------------------------------------

    def describe_conditioning(self) -> str:
        if self.num_classes is None:
            return "unconditional"
        shown = ",".join(map(str, self.label_pattern[:12])) + ("..." if len(self.label_pattern) > 12 else "")
        return f"classes {shown} with guidance scale {self.guidance_scale:g}"

    def apply_fn(self):
        """``apply_fn(params, x, t[, y])`` of the network (guided for class-conditional models)."""
        from dpmjax.nn import make_apply_fn, make_cfg_apply_fn

        if self.num_classes is None:
            return make_apply_fn(self.model, self.schedule)
        return make_cfg_apply_fn(self.model, self.schedule, self.guidance_scale)

    def report_apply_fn(self):
        """``apply_fn(params, x, t)`` for ``metrics.report`` (which passes no conditioning): the labels of a
        class-conditional model repeat ``--labels`` (default every class) within each batch."""
        import jax.numpy as jnp
        import numpy as np

        apply_fn = self.apply_fn()
        if self.num_classes is None:
            return apply_fn
        pattern = np.asarray(self.label_pattern, np.int32)
        return lambda params, x, t: apply_fn(params, x, t, y=jnp.asarray(np.resize(pattern, x.shape[0])))

    def report_options(self, batch_size: int) -> dict:
        """Keywords of ``metrics.report.quality_table`` for this plan (sampled with the params as an argument)."""
        from dpmjax.sharding import make_mesh

        options = dict(spacing=self.spacing, prediction=self.prediction, batch_size=batch_size, mesh=make_mesh())
        if "dpm_solver_v3" in self.solvers:
            options["solver_options"] = {"dpm_solver_v3": {"ems": self.ems}}
        return options

    # -- samplers --------------------------------------------------------------------------------------

    def sampler_kwargs(self, solver: str, nfe: int) -> dict:
        """``make_param_sampler`` keywords: those of the quality table's rows (``ddpm`` on training steps), plus
        the statistics of ``dpm_solver_v3``."""
        from dpmjax.metrics.report import sampler_kwargs

        return sampler_kwargs(self.schedule, solver, nfe, self.spacing,
                              {"ems": self.ems} if solver == "dpm_solver_v3" else {})

    def make_samplers(self, *, mesh=None, batch_size=None) -> dict:
        """{(solver, nfe): sampler}; building one validates it (nothing compiles until it is called)."""
        import dpmjax

        samplers, apply_fn = {}, self.apply_fn()
        for solver in self.solvers:
            for nfe in self.nfes:
                try:
                    samplers[(solver, nfe)] = dpmjax.make_param_sampler(
                        apply_fn, schedule=self.schedule, solver=solver, prediction=self.prediction, mesh=mesh,
                        batch_size=batch_size, **self.sampler_kwargs(solver, nfe))
                except ValueError as err:
                    raise UsageError(f"--solver {solver} --nfe {nfe}: {err}") from None
        return samplers

    def load_params(self):
        from dpmjax import workdir as workdir_lib

        step = workdir_lib.checkpoint_steps(self.workdir)[-1]
        start = time.perf_counter()
        kind = "converted weights" if self.config.get("pretrained") is not None else "EMA weights"
        print(f"loading {self.workdir} (checkpoint step {step}, {kind})", flush=True)
        _, params, _, _ = workdir_lib.load_params(self.workdir)
        _check_finite_params(params, self.workdir, step)
        print(f"loaded in {time.perf_counter() - start:.1f} s", flush=True)
        return params


# ------------------------------------------------------------------------------------------------ commands

def cmd_sample(args) -> int:
    if args.workdir:
        return cmd_sample_workdir(args)
    for flag, value in (("--labels", args.labels), ("--guidance-scale", args.guidance_scale), ("--ems", args.ems)):
        if value is not None:
            raise UsageError(f"{flag} applies to a trained model (--workdir); the oracle is unconditional")
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dpmjax
    from dpmjax.oracle import GaussianMixture, ode_solution
    from dpmjax.schedules import schedule_from_name

    oracle = args.oracle or "ring"
    if oracle not in ORACLES:
        raise UsageError(f"--oracle: unknown oracle {oracle!r}; choose one of {ORACLES}")
    solvers = _check_solvers(args.solvers or DEFAULT_SOLVERS.split(","), "--solvers")
    nfes = args.nfe or [5, 10, 20]
    spacing = _check_spacing(args.spacing or "logSNR")
    num = args.num or 1000
    if args.out:
        _check_output_file(args.out, "--out", ".npz")
    try:
        schedule = schedule_from_name(args.schedule or "linear")
    except ValueError as err:
        raise UsageError(f"--schedule: {err}") from None
    mixture = GaussianMixture.ring() if oracle == "ring" else GaussianMixture.random(seed=0, num_modes=6, dim=64)
    x_T = jax.random.normal(jax.random.key(args.seed), (num, mixture.dim), jnp.float32)
    t_start, t_end = schedule.default_t_start, schedule.default_t_end
    reference = ode_solution(mixture, np.asarray(x_T, np.float64), t_start, t_end, schedule)
    scale = float(np.sqrt(np.mean(reference ** 2)))
    model = mixture.model_fn(schedule)
    rows = []
    print(f"oracle={oracle} (dim {mixture.dim}) schedule={args.schedule or 'linear'} spacing={spacing} "
          f"samples={num}; error = RMS(x - exact ODE solution) / RMS(exact)")
    print(f"{'solver':<22}" + "".join(f"{'nfe=' + str(n):>12}" for n in nfes))
    outputs = {}
    for name in solvers:
        errors = []
        for nfe in nfes:
            if nfe < dpmjax.SOLVERS[name].min_nfe():
                errors.append(float("nan"))  # shown as nan: this solver needs more model calls
                continue
            key = jax.random.key(args.seed + 1)
            start = time.perf_counter()
            try:
                fn = dpmjax.make_sampler(model, schedule=schedule, solver=name, nfe=nfe, spacing=spacing)
            except ValueError as err:
                raise UsageError(f"--solvers {name} --nfe {nfe}: {err}") from None
            x0 = np.asarray(fn(x_T, key))
            seconds = time.perf_counter() - start
            err = float(np.sqrt(np.mean((x0 - reference) ** 2)) / scale)
            errors.append(err)
            outputs[f"{name}_nfe{nfe}"] = x0
            rows.append({"solver": name, "nfe": nfe, "relative_rmse": err, "seconds_incl_compile": seconds})
        print(f"{name:<22}" + "".join(f"{e:>12.2e}" for e in errors))
    if args.out and rows:
        np.savez(args.out, x_T=np.asarray(x_T), reference=reference, **outputs)
        with open(os.path.splitext(args.out)[0] + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.csv")
    return 0


def _output_path(args, workdir, solver, nfe, several):
    if not args.out:
        return os.path.join(workdir, f"samples_{solver}_nfe{nfe}.npz")
    if not several:
        return args.out
    return f"{os.path.splitext(args.out)[0]}_{solver}_nfe{nfe}.npz"


def cmd_sample_workdir(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from dpmjax import workdir as workdir_lib
    from dpmjax.metrics.report import image_grid
    from dpmjax.sharding import data_axis_size, make_mesh

    for flag, value in (("--oracle", args.oracle), ("--schedule", args.schedule)):
        if value is not None:
            raise UsageError(f"{flag} applies to the oracle (no --workdir); a workdir has its own model and schedule")
    if args.out:
        _check_output_file(args.out, "--out", ".npz")
    config, _ = _workdir(args.workdir, denoiser=True)
    custom = _method_sampler(config)
    if custom is not None:
        return _sample_with_method(args, config, custom)
    plan = _Sampling(args, config, args.workdir, solvers=args.solvers, nfes=args.nfe, num=args.num)
    several = len(plan.solvers) * len(plan.nfes) > 1
    outputs = {(s, n): _output_path(args, args.workdir, s, n, several) for s in plan.solvers for n in plan.nfes}
    for path in outputs.values():
        _check_output_file(path, "--out", ".npz")
    mesh = make_mesh()
    shards = data_axis_size(mesh)
    chunk = -(-min(args.batch_size, plan.num) // shards) * shards
    samplers = plan.make_samplers(mesh=mesh, batch_size=chunk)

    params = plan.load_params()
    noise_key, solver_key = jax.random.split(jax.random.key(args.seed))
    for (solver, nfe), sampler in samplers.items():
        print(f"sampling {plan.num} images with {solver}, {nfe} NFE, {plan.spacing} spacing, "
              f"{plan.describe_conditioning()}; the first batch of {chunk} compiles ({shards} device(s))", flush=True)
        parts, start = [], time.perf_counter()
        with tqdm(total=plan.num, unit="img", desc=f"{solver} nfe={nfe}", file=sys.stdout) as bar:
            for c, lo in enumerate(range(0, plan.num, chunk)):
                size = min(chunk, plan.num - lo)
                x_T = jax.random.normal(jax.random.fold_in(noise_key, c), (size,) + plan.shape, jnp.float32)
                cond = {} if plan.labels is None else {"y": plan.labels[lo:lo + size]}
                tick = time.perf_counter()
                parts.append(np.asarray(jax.device_get(sampler(params, x_T, jax.random.fold_in(solver_key, c),
                                                               **cond))))
                if c == 0:
                    bar.write(f"compiled and sampled the first batch in {time.perf_counter() - tick:.1f} s")
                bar.update(size)
        images = np.concatenate(parts)
        images = workdir_lib.decode_if_latent(config, images)  # a latent workdir's samples, decoded by its VAE
        finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        if not finite.all():
            raise NonFiniteError(f"{int((~finite).sum())} of {len(images)} samples from {solver} at {nfe} NFE are "
                                 f"not finite (NaN/inf); the weights of {args.workdir} or the sampler diverged; "
                                 "nothing was written")
        images = np.clip(images, -1.0, 1.0)
        out = outputs[(solver, nfe)]
        extra = {} if plan.labels is None else {"labels": plan.labels, "guidance_scale": plan.guidance_scale}
        np.savez(out, images=images, solver=solver, nfe=nfe, spacing=plan.spacing, seed=args.seed, **extra)
        image_grid(images, os.path.splitext(out)[0] + ".png")
        print(f"wrote {out} and {os.path.splitext(out)[0]}.png ({len(images)} samples in "
              f"{time.perf_counter() - start:.1f} s)", flush=True)
    return 0


def _method_sampler(config):
    """The ``sample_workdir`` of the method that wrote a workdir (``dpmjax finetune``), or None."""
    method = config.get("method")
    if method is None:
        return None
    from dpmjax.methods import get_method

    return get_method(method.get("name")).sample_workdir


def _sample_with_method(args, config, sample_workdir) -> int:
    """`dpmjax sample` on a workdir its method samples itself (e.g. DPM-OT's map, then k solver steps)."""
    import numpy as np

    from dpmjax.metrics.report import image_grid
    from dpmjax.workdir import sample_settings

    if args.labels is not None or args.guidance_scale is not None or args.ems is not None:
        raise UsageError(f"--labels / --guidance-scale / --ems do not apply to a {config.method.name} workdir")
    settings = sample_settings(config)
    solvers = _check_solvers(args.solvers, "--solvers") if args.solvers else [settings["solver"]]
    nfes = args.nfe or [int(settings["nfe"])]
    if len(solvers) * len(nfes) > 1:
        raise UsageError(f"a {config.method.name} workdir samples one solver and NFE at a time")
    solver, nfe, num = solvers[0], int(nfes[0]), args.num or int(settings["num"])
    out = _output_path(args, args.workdir, solver, nfe, False)
    _check_output_file(out, "--out", ".npz")
    print(f"sampling {num} images with {config.method.name} ({solver}, {nfe} NFE)", flush=True)
    start = time.perf_counter()
    images = np.asarray(sample_workdir(args.workdir, num, seed=args.seed, solver=solver, nfe=nfe,
                                       spacing=args.spacing, batch_size=args.batch_size))
    if not np.isfinite(images).all():
        raise NonFiniteError(f"samples of {args.workdir} are not finite (NaN/inf); nothing was written")
    images = np.clip(images, -1.0, 1.0)
    np.savez(out, images=images, solver=solver, nfe=nfe, spacing=args.spacing or settings["spacing"],
             seed=args.seed, method=config.method.name)
    image_grid(images, os.path.splitext(out)[0] + ".png")
    print(f"wrote {out} and {os.path.splitext(out)[0]}.png ({len(images)} samples in "
          f"{time.perf_counter() - start:.1f} s)", flush=True)
    return 0


def _run_training(config, workdir, *, num_devices, transfer_guard, quiet=False):
    """``dpmjax.train.loop.train`` with implicit device -> host transfers guarded (``TRANSFER_GUARD_LEVELS``)."""
    import jax

    from dpmjax.train import loop

    with jax.transfer_guard_device_to_host(transfer_guard):
        try:
            return loop.train(config, workdir, num_devices=num_devices, quiet=quiet)
        except Exception as err:
            if "Disallowed device-to-host transfer" in str(err):
                print("dpmjax: the training loop read a device value implicitly (a bug in the loop: host reads must "
                      "be jax.device_get at log steps); rerun with --transfer-guard log to list them",
                      file=sys.stderr)
            raise


def cmd_train(args, extra) -> int:
    from dpmjax.config import load_config

    if args.multihost:
        import jax
        jax.distributed.initialize()
    config = load_config(args.config, extra)
    _check_output_dir(args.workdir, "--workdir")
    _check_num_devices(args.num_devices)
    _run_training(config, args.workdir, num_devices=args.num_devices, transfer_guard=args.transfer_guard)
    print(f"trained {config.train.num_steps} steps; checkpoints in {os.path.abspath(args.workdir)}/checkpoints")
    return 0


def cmd_finetune(args, extra) -> int:
    from dpmjax.config import configs_dir, load_config
    from dpmjax.methods import get_method
    from dpmjax.methods.base import Teacher, abstract_teacher, teacher_section
    from dpmjax.methods.loop import finetune, validate_run
    from dpmjax.workdir import load_config_of, load_teacher

    get_method(args.method)  # an unknown name fails first, listing the methods
    config = load_config(args.config or os.path.join(configs_dir(), "methods", f"{args.method}.py"), extra)
    teacher_config = load_config_of(args.teacher)  # a missing teacher fails before anything is built
    _check_output_dir(args.workdir, "--workdir")
    _check_num_devices(args.num_devices)
    if os.path.abspath(args.teacher) == os.path.abspath(args.workdir):
        raise UsageError("--workdir is the teacher's workdir: write the finetuned model to another folder")
    shapes = abstract_teacher(teacher_section(Teacher(None, None, None, teacher_config, args.teacher)))
    validate_run(args.method, config, shapes, num_devices=args.num_devices)  # before restoring or compiling
    teacher = load_teacher(args.teacher)
    print(f"finetuning {args.teacher} with {args.method} for {config.train.num_steps} steps in "
          f"{os.path.abspath(args.workdir)}", flush=True)
    finetune(args.method, teacher, config, args.workdir, num_devices=args.num_devices)
    print(f"finetuned {config.train.num_steps} steps; `dpmjax sample --workdir {args.workdir}` samples the result")
    return 0


def _domain_dataset(config, workdir, command):
    from dpmjax.metrics.domain import CONFIGS

    name = config.get("data", {}).get("name")
    if name not in CONFIGS:
        raise UsageError(f"--workdir: `dpmjax {command}` measures quality with a classifier of {tuple(CONFIGS)}, and "
                         f"{workdir} was trained on {name!r}; use experiments/fid_vs_nfe.py for FID")
    return name


def _print_table(rows):
    fid = "fid" in rows[0]
    print(f"{'sampler':<26}{'NFE':>6}{'Frechet (classifier)':>22}{'confident > 0.9':>18}{'seconds':>10}"
          + (f"{'FID':>10}{'KID':>10}" if fid else ""))
    for r in rows:
        print(f"{r['solver']:<26}{r['nfe']:>6}{r['frechet']:>22.3f}{r['confident_share']:>18.3f}"
              f"{r['seconds']:>10.1f}" + (f"{r['fid']:>10.2f}{r['kid']:>10.4f}" if fid else ""))


def cmd_eval(args) -> int:
    from dpmjax.metrics import report

    out_dir = _check_output_dir(args.out_dir, "--out-dir") if args.out_dir else None
    config, _ = _workdir(args.workdir, denoiser=True)
    _domain_dataset(config, args.workdir, "eval")
    if _method_sampler(config) is not None:
        raise UsageError(f"--workdir: `dpmjax eval` does not score {config.method.name} workdirs yet (their sampler "
                         f"transforms the noise first); `dpmjax sample` draws them and experiments/"
                         f"{config.method.name}.py scores them")
    plan = _Sampling(args, config, args.workdir, solvers=args.solvers, nfes=args.nfe, num=args.num)
    plan.make_samplers()  # validates every (solver, NFE) of the table before the first row runs
    out_dir = out_dir or _check_output_dir(os.path.join(args.workdir, "eval"), "--out-dir")
    params = plan.load_params()
    print(f"quality table: {len(plan.solvers) * len(plan.nfes)} rows of {plan.num} samples "
          f"({plan.describe_conditioning()}); each row is added to {out_dir}/quality.csv when it is done", flush=True)
    rows, _, _ = report.quality_table(plan.report_apply_fn(), plan.schedule, config, solvers=plan.solvers,
                                      nfes=plan.nfes, num=plan.num, ddpm_steps=args.ddpm_steps or None,
                                      out_dir=out_dir, fid_num=args.fid_num, params=params,
                                      **plan.report_options(args.batch_size))
    _print_table(rows)
    print(f"wrote {out_dir}/quality.csv and quality.png")
    return 0


def cmd_quickstart(args, extra) -> int:
    from dpmjax.config import load_config
    from dpmjax.metrics import report

    start = time.perf_counter()
    workdir = _check_output_dir(args.workdir, "--workdir")
    config = load_config(args.config, extra)
    _domain_dataset(config, args.workdir, "quickstart")
    _check_num_devices(args.num_devices)
    nfes = args.nfe
    grid_nfe = 10 if 10 in nfes else nfes[len(nfes) // 2]
    print(f"[1/3] training {args.config} for {config.train.num_steps} steps in {workdir}", flush=True)
    _run_training(config, workdir, num_devices=args.num_devices, transfer_guard=args.transfer_guard)
    trained, _ = _workdir(workdir)
    plan = _Sampling(args, trained, workdir, solvers=["dpmpp_2m"], nfes=nfes, num=args.num)
    print(f"[2/3] sampling: dpmpp_2m at {'/'.join(map(str, nfes))} NFE"
          + (f", and {args.ddpm_steps}-step DDPM (the reference sampler)" if args.ddpm_steps else ""), flush=True)
    params = plan.load_params()
    rows, samples, _ = report.quality_table(plan.report_apply_fn(), plan.schedule, trained, solvers=["dpmpp_2m"],
                                            nfes=nfes, num=args.num, ddpm_steps=args.ddpm_steps or None,
                                            ddpm_num=args.ddpm_num, out_dir=os.path.join(workdir, "eval"),
                                            params=params, **plan.report_options(args.batch_size))
    grid = os.path.join(workdir, f"samples_dpmpp_2m_nfe{grid_nfe}.png")
    report.image_grid(samples[("dpmpp_2m", grid_nfe)], grid)
    print("[3/3] quality (Frechet distance in a classifier's feature space; lower is better):")
    _print_table(rows)
    print(f"sample grid: {grid}; table: {workdir}/eval/quality.csv; total {time.perf_counter() - start:.0f} s")
    return 0


def cmd_ems(args) -> int:
    from dpmjax import workdir as workdir_lib

    if args.out:
        _check_output_file(args.out, "--out", ".npz")
    config, steps = _workdir(args.workdir, denoiser=True)
    if not config.get("data", {}).get("name"):
        raise UsageError(f"--workdir: {args.workdir} names no training dataset (config.data.name): the statistics "
                         "are estimated from data")
    print(f"DPM-Solver-v3 statistics of {args.workdir} (checkpoint step {steps[-1]}): {args.num_grid} grid "
          f"intervals, {args.num_samples} training images", flush=True)
    ems, path = workdir_lib.compute_workdir_ems(args.workdir, num_grid=args.num_grid, num_samples=args.num_samples,
                                                path=args.out)
    print(f"wrote {path} ({ems.info.get('seconds', 0.0):.0f} s); sample with: dpmjax sample --workdir "
          f"{args.workdir} --solver dpm_solver_v3 --nfe 10")
    return 0


def cmd_convert(args) -> int:
    from dpmjax.metrics.weights import UnsafeCheckpointError
    from dpmjax.convert import convert_diffusers

    try:
        out = convert_diffusers(args.from_diffusers, args.out, scheduler_config=args.scheduler_config,
                                image_size=args.image_size, overwrite=args.overwrite)
    except UnsafeCheckpointError as err:
        raise UsageError(f"--from-diffusers: refusing to load {args.from_diffusers}: {err}") from None
    print(f"sample it with: dpmjax sample --workdir {out} --solver dpmpp_2m --nfe 10 --num 64")
    return 0


def cmd_solvers(args) -> int:
    import dpmjax
    for name, entry in sorted(dpmjax.SOLVERS.items()):
        options = ", ".join(o for o in entry.options if not o.startswith("_"))
        print(f"{name:<22} options: {options or '-'}{'  (stochastic: needs key)' if entry.stochastic else ''}")
    return 0


# ------------------------------------------------------------------------------------------------ delta prune

def cmd_delta_prune(args) -> int:
    """`dpmjax delta prune`: DARE / DAREx / magnitude pruning of finetuned - base (``dpmjax.methods.dare``)."""
    import jax

    from dpmjax.methods import dare
    from dpmjax.workdir import checkpoint_steps, load_config_of, load_params

    try:
        p = dare.check_rate(args.p)
    except ValueError as err:
        raise UsageError(f"--p: {err}") from None
    if args.q is not None and args.variant != "dare_q":
        raise UsageError(f"--q applies to --variant dare_q (the given rescale 1/q), not {args.variant}")
    if args.q is not None and not (1.0 - p - 1e-9 <= args.q <= 1.0):
        raise UsageError(f"--q {args.q:g}: q must be in [1 - p, 1] = [{1.0 - p:g}, 1]")
    if args.eta is not None and args.variant != "dare_q_analytic":
        raise UsageError(f"--eta applies to --variant dare_q_analytic, not {args.variant}")
    if args.eta is not None and not args.eta > 0:
        raise UsageError(f"--eta {args.eta:g}: eta must be positive")
    out = _check_output_dir(args.out, "--out")
    if os.path.exists(out):
        raise UsageError(f"--out {out} already exists: write the pruned model to a new folder")
    configs = {}
    for flag, workdir in (("--base", args.base), ("--finetuned", args.finetuned)):
        try:
            configs[flag] = load_config_of(workdir)
            checkpoint_steps(workdir)
        except FileNotFoundError as err:
            raise UsageError(f"{flag}: {err}") from None
    try:
        dare.check_same_architecture(dare.abstract_params_of(configs["--finetuned"]),
                                     dare.abstract_params_of(configs["--base"]))
    except ValueError as err:
        raise UsageError(f"--base {args.base} and --finetuned {args.finetuned}: {err}") from None
    needs_batch = args.variant == "dare_q_analytic" or (args.variant == "dare_q" and args.q is None)
    if needs_batch:
        from dpmjax.train.loop import build_data

        if not configs["--finetuned"].get("data", {}).get("name"):
            raise UsageError(f"--variant {args.variant} chooses q on a batch of the finetuned model's data, and "
                             f"{args.finetuned} records no dataset (config.data.name); pass --q or use --variant dare")
        build_data(configs["--finetuned"])  # a missing folder / too few shots fails here, before loading
    model, base, schedule, _ = load_params(args.base)
    _, finetuned, _, _ = load_params(args.finetuned)
    _check_finite_params(base, args.base, checkpoint_steps(args.base)[-1])
    _check_finite_params(finetuned, args.finetuned, checkpoint_steps(args.finetuned)[-1])
    start = time.perf_counter()
    calibration = (dare.calibration_batch(configs["--finetuned"], jax.random.key(args.seed + 1))
                   if needs_batch else None)
    dense = tuple(args.keep_dense or ())
    pruned, info = dare.prune_workdirs(base, finetuned, variant=args.variant, p=p, seed=args.seed, q=args.q,
                                       eta=args.eta, model=model, schedule=schedule, calibration=calibration,
                                       dense=dense)
    sparse = dare.sparsify(pruned, info={**info, "keep_dense": list(dense)}, dense=dense)
    merged = dare.apply(base, sparse)
    size, out = dare.write_pruned_workdir(out, finetuned_config=configs["--finetuned"], merged=merged, sparse=sparse,
                                          sources={"base": os.path.abspath(args.base),
                                                   "finetuned": os.path.abspath(args.finetuned)})
    total = sum(int(leaf.values.size) for leaf in sparse.leaves.values())
    count = sum(int(jax.numpy.size(leaf)) for leaf in jax.tree.leaves(pruned))
    scale = f", q={info['q']:.4g}" if "q" in info else (f", eta={info['eta']:.3g}, per-layer q in "
                                                          f"[{info['q_min']:.3g}, {info['q_max']:.3g}]"
                                                          if "eta" in info else "")
    print(f"{args.variant} p={p:g}{scale}: kept {total:,} of {count:,} delta entries ({total / max(count, 1):.2%}) "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"sparse delta {os.path.join(out, dare.DELTA_FILE)}: {size:,} bytes (dense: {dare.dense_nbytes(sparse):,} "
          f"bytes, {size / max(dare.dense_nbytes(sparse), 1):.1%})")
    print(f"wrote {out}; sample it with: dpmjax sample --workdir {out}")
    return 0


def _add_delta_parser(sub, kw):
    from dpmjax.methods.dare import VARIANTS

    d = sub.add_parser("delta", help="operations on the delta between a finetuned workdir and its base",
                       description="Operations on finetuned - base (dpmjax/methods/dare.py).", **kw)
    ops = d.add_subparsers(dest="delta_command", parser_class=_Parser, required=True)
    p = ops.add_parser("prune", help="DARE / DAREx / magnitude pruning of the delta, stored sparsely",
                       description="Prune d = finetuned - base and write OUT/delta.npz (indices or bit mask + values) "
                                   "and a workdir holding base + pruned delta (`dpmjax sample --workdir OUT`). "
                                   "Variants: dare (drop with prob. p, rescale 1/(1-p)); dare_q (DAREx-q: rescale "
                                   "1/q, q given by --q or chosen on one batch of the finetuned data by the output "
                                   "change); dare_q_analytic (DAREx per-layer analytic q); magnitude (keep the top "
                                   "1-p of |d| per tensor).", **kw)
    p.add_argument("--base", required=True, help="the pretrained workdir (theta_pre)")
    p.add_argument("--finetuned", required=True, help="the finetuned workdir (same architecture)")
    p.add_argument("--p", required=True, type=_type(lambda t: float(t), "a number"), metavar="P",
                   help="drop rate in [0, 1)")
    p.add_argument("--variant", required=True, choices=VARIANTS, help="pruning variant")
    p.add_argument("--q", type=_type(lambda t: float(t), "a number"), default=None,
                   help="dare_q: the rescale q in [1-p, 1] (default: chosen on one batch by the output change)")
    p.add_argument("--eta", type=_type(lambda t: float(t), "a number"), default=None,
                   help="dare_q_analytic: eta of the analytic objective (default: chosen on one batch)")
    p.add_argument("--keep-dense", type=name_list, default=None, metavar="S[,S...]",
                   help="leaves whose path contains one of these substrings (e.g. norm) are kept whole, unpruned "
                        "(default: prune every floating leaf, as DARE)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the drop mask and the calibration batch")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must not exist)")
    p.set_defaults(func=cmd_delta_prune)


# ------------------------------------------------------------------------------------------------ the parser

def _add_sampling_flags(p, *, oracle: bool):
    also = (lambda text: f"; the oracle: {text}") if oracle else (lambda text: "")
    p.add_argument("--solvers", "--solver", type=name_list, default=None, metavar="S[,S...]",
                   help="solver names, comma-separated (`dpmjax solvers` lists them; default: config.sample.solver "
                        f"of the workdir{also(DEFAULT_SOLVERS)})")
    p.add_argument("--nfe", type=nfe_list, default=None, metavar="N[,N...]",
                   help=f"model evaluations per sample, comma-separated (default: config.sample.nfe of the "
                        f"workdir{also('5,10,20')})")
    p.add_argument("--spacing", default=None,
                   help="time-grid spacing: logSNR, time_uniform, time_quadratic, karras, linspace, leading, "
                        f"trailing (default: config.sample.spacing of the workdir{also('logSNR')})")
    p.add_argument("--labels", type=label_list, default=None, metavar="L[,L...]",
                   help="class labels to sample (class-conditional workdirs), repeated to fill the batch "
                        "(default: every class in turn)")
    p.add_argument("--guidance-scale", type=non_negative_float, default=None, metavar="S",
                   help="classifier-free guidance scale for class-conditional workdirs: 1 = the conditional "
                        "model, 0 = unconditional (default: config.sample.guidance_scale of the workdir)")
    p.add_argument("--ems", default=None, metavar="FILE|none",
                   help="DPM-Solver-v3 statistics for --solver dpm_solver_v3 (default: the newest "
                        "WORKDIR/ems/*.npz that `dpmjax ems` wrote; `none`: degenerate statistics on purpose)")


def _add_training_flags(p):
    p.add_argument("--num-devices", type=positive_int, default=None, metavar="N",
                   help="train on the first N devices (default: all devices, every host's)")
    p.add_argument("--transfer-guard", choices=TRANSFER_GUARD_LEVELS, default="disallow",
                   help="jax transfer guard for implicit device-to-host transfers during training "
                        "(`log` lists them, `allow` turns the guard off)")


def cmd_serve(args) -> int:
    """Check the workdir, the options and the port, compile the engine, then serve (``dpmjax.serve.app``)."""
    import socket

    from dpmjax.serve.app import serve
    from dpmjax.serve.engine import EngineConfig

    _workdir(args.workdir, denoiser=True)
    options = dict(num_rows=args.batch_rows, max_nfe=args.max_nfe, adapter_slots=args.adapter_slots,
                   max_rank=args.max_rank, latency_target_s=args.latency_target_ms / 1000.0, mode=args.mode,
                   max_train_rows=args.max_train_rows, checkpoint_every=args.checkpoint_every)
    try:
        EngineConfig(**options)
    except ValueError as err:
        raise UsageError(str(err)) from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # fail now, not after compiling
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            raise UsageError(f"--host {args.host} --port {args.port}: cannot bind: {err.strerror}") from None

    def ready(engine):
        print(f"dpmjax serve: {args.workdir} ({engine.config.mode}, {engine.config.num_rows} rows, programs "
              f"compiled); listening on http://{args.host}:{args.port}", flush=True)

    serve(args.workdir, host=args.host, port=args.port, state_dir=args.state_dir, max_body_bytes=args.max_body_bytes,
          ready=ready, **options)
    return 0


def _add_serve_parser(sub, kw):
    v = sub.add_parser("serve", help="HTTP sampling server that co-serves LoRA finetuning (dpmjax.serve)",
                       description="Serve a trained workdir over HTTP: POST /sample, POST /finetune, GET /jobs/ID, "
                                   "GET /metrics. Sampling requests and LoRA finetuning rows share each compiled "
                                   "batch (co-serving).", **kw)
    v.add_argument("--workdir", required=True, help="a trained, converted or finetuned workdir")
    v.add_argument("--host", default="127.0.0.1", help="address to bind")
    v.add_argument("--port", type=port_number, default=8000, help="port to bind")
    v.add_argument("--batch-rows", type=positive_int, default=32,
                   help="rows of every iteration's batch (sampling images + training examples); also the most "
                        "images one request may ask for")
    v.add_argument("--latency-target-ms", type=non_negative_float, default=2000.0,
                   help="default per-request latency target; training rows yield when they would break it")
    v.add_argument("--max-nfe", type=positive_int, default=50, help="largest NFE a request may ask for")
    v.add_argument("--adapter-slots", type=positive_int, default=4,
                   help="adapter slots per batch (base + training + finished adapters)")
    v.add_argument("--max-rank", type=positive_int, default=8, help="largest LoRA rank of a job")
    v.add_argument("--max-train-rows", type=positive_int, default=None,
                   help="training slots per iteration, a fixed bucket of the co-serving program; a job takes at "
                        "most this many of the rows sampling leaves free (default: half of --batch-rows)")
    v.add_argument("--checkpoint-every", type=positive_int, default=10, help="finetuning steps between checkpoints")
    v.add_argument("--mode", choices=("coserve", "batch", "sequential"), default="coserve",
                   help="coserve: sampling + finetuning in one batch; batch: sampling only (continuous batching); "
                        "sequential: one request at a time, no batching (baselines)")
    v.add_argument("--state-dir", default=None, help="jobs and adapters (default: WORKDIR/serve)")
    v.add_argument("--max-body-bytes", type=positive_int, default=8 * 1024 * 1024,
                   help="larger request bodies get 413")
    v.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpmjax", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    kw = dict(formatter_class=_HelpFormatter)

    p = sub.add_parser("sample", help="sample a trained workdir (or the exact-score oracle without --workdir)",
                       description="Sample a trained workdir (npz + PNG grid), or without --workdir the Gaussian-"
                                   "mixture oracle (errors against the exact ODE solution).", **kw)
    p.add_argument("--workdir", default=None, help="a trained or converted workdir (default: sample the oracle)")
    _add_sampling_flags(p, oracle=True)
    p.add_argument("--num", type=positive_int, default=None,
                   help="number of samples (default: config.sample.num of the workdir; the oracle: 1000)")
    p.add_argument("--batch-size", type=positive_int, default=500,
                   help="samples per compiled batch (rounded up to a multiple of the device count)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial noise and solver noise")
    p.add_argument("--out", default=None, metavar="FILE.npz",
                   help="output file in an existing folder; several solvers/NFEs add _SOLVER_nfeN to its name "
                        "(default: WORKDIR/samples_SOLVER_nfeN.npz; the oracle writes nothing)")
    p.add_argument("--oracle", default=None, help=f"oracle mode: one of {ORACLES} (default: ring)")
    p.add_argument("--schedule", default=None, help="oracle mode: noise schedule name (default: linear)")
    p.set_defaults(func=cmd_sample)

    s = sub.add_parser("solvers", help="list the registered solvers", **kw)
    s.set_defaults(func=cmd_solvers)

    t = sub.add_parser("train", help="train a config (extra --config.a.b=v override config fields)",
                       description="Train a config; --config.a.b=VALUE overrides a field (same type as the default).",
                       **kw)
    t.add_argument("--config", required=True, metavar="FILE.py[:VARIANT]",
                   help="a config file (configs/NAME.py; variants such as :runlocal after a colon)")
    t.add_argument("--workdir", required=True, help="checkpoints, config.json and metrics.jsonl go here "
                                                    "(created; an existing run resumes)")
    _add_training_flags(t)
    t.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize() first")
    t.set_defaults(func=cmd_train, takes_extra=True)

    e = sub.add_parser("eval", help="quality table of a trained workdir per solver and NFE",
                       description="Quality table (classifier Frechet distance, confident share, optional FID) "
                                   "per solver and NFE, written row by row to OUT_DIR/quality.csv.", **kw)
    e.add_argument("--workdir", required=True, help="a trained workdir")
    _add_sampling_flags(e, oracle=False)
    e.add_argument("--num", type=positive_int, default=1000, help="samples per row")
    e.add_argument("--batch-size", type=positive_int, default=500,
                   help="samples per compiled batch (rounded up to a multiple of the device count)")
    e.add_argument("--ddpm-steps", type=non_negative_int, default=0,
                   help="also a DDPM row with this many steps, e.g. 1000 (0: none)")
    e.add_argument("--out-dir", default=None, help="folder for quality.csv / quality.png (default: WORKDIR/eval)")
    e.add_argument("--fid-num", type=non_negative_int, default=0,
                   help="also FID/KID (Inception, real weights) on this many samples per row (0: none)")
    e.set_defaults(func=cmd_eval)

    from dpmjax.methods import METHOD_MODULES

    f = sub.add_parser("finetune", help="finetune / distil a trained workdir with a method (--config.a.b=v overrides)",
                       description="Run a finetuning or distillation method on a frozen teacher workdir; the output "
                                   "workdir samples like any other (`dpmjax sample --workdir OUT`). "
                                   "--config.a.b=VALUE overrides a field of the method config.", **kw)
    f.add_argument("--method", required=True, choices=list(METHOD_MODULES), help="the method (dpmjax/methods/NAME.py)")
    f.add_argument("--teacher", required=True, help="a trained, converted or finetuned workdir (frozen)")
    f.add_argument("--workdir", required=True, help="output folder (created; an existing run resumes)")
    f.add_argument("--config", default=None, metavar="FILE.py[:VARIANT]",
                   help="the method config (default: configs/methods/METHOD.py)")
    _add_training_flags(f)
    f.set_defaults(func=cmd_finetune, takes_extra=True)

    m = sub.add_parser("ems", help="DPM-Solver-v3 empirical model statistics of a trained workdir", **kw)
    m.add_argument("--workdir", required=True, help="a trained workdir (its training data is used)")
    m.add_argument("--num-grid", type=positive_int, default=120, help="grid intervals N in logSNR")
    m.add_argument("--num-samples", type=positive_int, default=1024, help="training images K")
    m.add_argument("--out", default=None, metavar="FILE.npz",
                   help="output file (default: WORKDIR/ems/ems_N{num_grid}_K{num_samples}.npz, where sample finds it)")
    m.set_defaults(func=cmd_ems)

    c = sub.add_parser("convert", help="convert a diffusers UNet2DModel folder into a dpmjax checkpoint folder",
                       **kw)
    c.add_argument("--from-diffusers", required=True, metavar="DIR",
                   help="pipeline folder (unet/, scheduler/) or model folder (config.json + weights)")
    c.add_argument("--out", required=True, metavar="DIR", help="folder to create (written atomically)")
    c.add_argument("--scheduler-config", default=None, metavar="FILE",
                   help="scheduler_config.json (default: found beside the UNet, else DDPMScheduler's defaults)")
    c.add_argument("--image-size", type=positive_int, default=None,
                   help="sample size when config.json has none (default: config.json's sample_size)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.set_defaults(func=cmd_convert)

    q = sub.add_parser("quickstart", help="the main job: train digits, sample, report quality",
                       description="Train, sample at a few NFE and write the quality table. --config.a.b=VALUE "
                                   "overrides a config field.", **kw)
    q.add_argument("--workdir", default="runs/digits", help="run folder (created; a finished run is reused)")
    q.add_argument("--config", default="configs/digits.py", metavar="FILE.py[:VARIANT]",
                   help="the config to train (configs/digits.py:runlocal: a seconds-long smoke run)")
    q.add_argument("--num", type=positive_int, default=1000, help="samples per table row")
    q.add_argument("--nfe", type=nfe_list, default="5,10,20", metavar="N[,N...]",
                   help="NFEs of the dpmpp_2m rows")
    q.add_argument("--ddpm-steps", type=non_negative_int, default=1000,
                   help="steps of the DDPM reference row (0: none)")
    q.add_argument("--ddpm-num", type=positive_int, default=250, help="samples of the DDPM row")
    q.add_argument("--batch-size", type=positive_int, default=500,
                   help="samples per compiled batch (rounded up to a multiple of the device count)")
    _add_training_flags(q)
    q.set_defaults(func=cmd_quickstart, takes_extra=True)
    _add_delta_parser(sub, kw)
    _add_serve_parser(sub, kw)
    return parser


# ------------------------------------------------------------------------------------------------ entry point

def _user_error_types():
    """Errors that report a user mistake or a failed check (one line, exit 2), not a bug in dpmjax."""
    types_ = [ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError]
    for module, name in (("dpmjax.train.checkpoint", "CheckpointError"), ("dpmjax.samplers.driver", "SamplingError"),
                         ("dpmjax.train.loop", "StepFailedError")):
        cls = getattr(sys.modules.get(module), name, None)  # only raised once its module was imported
        if cls is not None:
            types_.append(cls)
    return tuple(types_)


def _parse(parser, argv):
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        args, extra = parser.parse_known_args(["quickstart"] + argv)
    if extra and not getattr(args, "takes_extra", False):
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    return args, extra


def main(argv=None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit status (module doc)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args, extra = _parse(parser, argv)
        return args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args)
    except SystemExit as exit_:  # --help / --version, and a SIGTERM during training (exit 143)
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt as err:
        print(f"dpmjax: interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - user mistakes become one line; everything else re-raises
        if os.environ.get("DPMJAX_DEBUG") or not isinstance(err, _user_error_types()):
            raise
        from dpmjax.train.resume import ConfigMismatchError

        # one line, except a refused resume, whose message is a short diff of the differing keys
        message = str(err) if isinstance(err, ConfigMismatchError) else " ".join(str(err).split())
        message = message or type(err).__name__
        print(f"dpmjax: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
