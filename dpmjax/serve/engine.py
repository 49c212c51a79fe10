"""The co-serving engine: continuous batching of sampling requests with LoRA finetuning rows (FlexLLM for DPMs).

    engine = Engine.from_workdir("runs/digits", EngineConfig(num_rows=32), state_dir="runs/digits/serve")
    engine.submit_sample(engine.parse_sample({"num": 4, "solver": "dpmpp_2m", "nfe": 10, "seed": 0}), on_done)
    job_id = engine.submit_finetune({"name": "threes", "dataset": "digits", "classes": [3], "steps": 200})
    while busy: engine.step()           # or engine.run(stop_event) in a thread

Every iteration runs ONE compiled program (``dpmjax.serve.programs`` documents the row layout): ``sample_step``
(one solver step for every sampling row of the R-row batch) or ``coserve_step`` (the same, plus the denoising
loss of up to T training examples, lent the rows sampling left free, and its gradient w.r.t. the trained adapter
only). FlexLLM (Oliaro et al., NSDI 2026) fuses inference and finetuning tokens in one iteration under a token
scheduler that protects the inference SLO; here the unit is a row of the denoiser batch.

Scheduler rule, once per iteration (host side, ``step``):
  1. Admission (continuous batching): queued requests join in arrival order while their images fit in the free
     rows and their adapter has a slot; a request that does not fit blocks later ones (no starvation).
  2. Training rows: the active finetuning job gets min(free rows, rows its batch still needs, T) rows (T the
     training bucket, ``max_train_rows``, default R // 2), but only when co-serving keeps every in-flight
     request's latency target: with t_co and t_s the measured (EMA) durations of a co-serving and a
     sampling-only iteration, a request with k steps left and deadline d (arrival + its latency target) vetoes
     training when now + k t_co > d >= now + k t_s, i.e. when training would be what makes it late.
Because the shapes are fixed (R sampling rows, T training slots), an iteration's cost depends on which program
runs, not on how the rows are split: the latency decision is between the two programs, and the row count then
follows from the free rows.

Buckets (nothing compiles at run time): the row count R, the training slots T, the longest grid ``max_nfe``,
the solvers of ``ROW_SOLVERS`` (a per-row index), K adapter slots of one padded rank. Five programs (sampling
step, co-serving step, Adam update, optimizer init, request noise) compile at start-up (``warm_up``);
``programs.compile_count`` stays constant afterwards (tests/test_serve.py checks it).

Modes: "coserve" (the above); "batch" (continuous batching of sampling only; finetuning refused: a separate
trainer process is the baseline); "sequential" (one request at a time through the library's
``dpmjax.make_param_sampler``, no batching: the other baseline).

Reliability: requests are validated before they join (``RequestError`` carries the HTTP status); a job whose
loss or adapter turns non-finite is stopped and marked failed while sampling rows continue (rows are
independent: the trained adapter only reaches the training rows); jobs checkpoint every ``checkpoint_every``
steps (``dpmjax.serve.store``) and resume from there when an engine starts on the same state folder.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import queue
import threading
import time
import uuid
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.nn.lora import check_lora, init_lora, merge_lora
from dpmjax.serve import programs as prog
from dpmjax.serve import store

__all__ = ["EngineConfig", "Engine", "RequestError", "SampleSpec", "MODES", "JOB_STATES"]

MODES = ("coserve", "batch", "sequential")
JOB_STATES = ("queued", "running", "done", "failed")
_EMA = 0.2  # weight of the newest iteration time in the duration estimates


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP status (4xx), the message names the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Fixed buckets and policies of an engine (all shapes are decided here, once)."""

    num_rows: int = 32               # R: rows of every iteration's batch
    max_nfe: int = 50                # longest per-row grid (NFE above it is refused)
    adapter_slots: int = 4           # K: slot 0 base, slot 1 training, K - 2 finished adapters
    max_rank: int = 8                # every adapter is zero-padded to this rank
    latency_target_s: float = 2.0    # default per-request latency target
    mode: str = "coserve"
    max_train_rows: int | None = None  # T: training slots per iteration, a fixed bucket (None: R // 2, at least 1)
    checkpoint_every: int = 10       # finetuning steps between job checkpoints
    max_steps: int = 100_000         # largest finetuning job
    max_queue: int = 1024            # queued sampling requests beyond this get 503

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("num_rows", "max_nfe", "max_rank", "checkpoint_every", "max_steps", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_train_rows is not None and (isinstance(self.max_train_rows, bool) or not isinstance(
                self.max_train_rows, int) or not 1 <= self.max_train_rows <= self.num_rows):
            raise ValueError(f"max_train_rows must be an integer in [1, num_rows={self.num_rows}], got "
                             f"{self.max_train_rows!r}")
        if self.adapter_slots < 2:
            raise ValueError(f"adapter_slots must be >= 2 (the base and the training slot), got {self.adapter_slots}")
        if not (self.latency_target_s > 0 and math.isfinite(self.latency_target_s)):
            raise ValueError(f"latency_target_s must be a positive number, got {self.latency_target_s!r}")


@dataclasses.dataclass
class SampleSpec:
    """A validated sampling request."""

    num: int
    solver: str
    nfe: int
    seed: int
    labels: np.ndarray | None        # [num] int32 (class-conditional models)
    adapter: str | None
    spacing: str
    latency_target_s: float
    format: str = "png"


@dataclasses.dataclass
class _Request:
    spec: SampleSpec
    times: np.ndarray                # [max_nfe + 1] padded grid
    on_done: Callable                # on_done(images [num, H, W, C] or None, error message or None)
    arrival: float
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    rows: list = dataclasses.field(default_factory=list)
    slot: int = 0
    steps_done: int = 0

    @property
    def deadline(self) -> float:
        return self.arrival + self.spec.latency_target_s


_SAMPLE_FIELDS = {"num", "solver", "nfe", "seed", "label", "labels", "adapter", "spacing", "latency_target_ms",
                  "format"}
_FINETUNE_FIELDS = {"name", "dataset", "classes", "images_npz", "steps", "rank", "alpha", "lr", "batch_size", "seed"}
_DATASETS = ("digits",)


def _int_field(body, name, default, lo, hi, status=422):
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(status, f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _float_field(body, name, default, lo, hi):
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo < value <= hi:
        raise RequestError(422, f"{name} must be a number in ({lo:g}, {hi:g}], got {value!r}")
    return float(value)


class Engine:
    """Host side of co-serving: request and job bookkeeping around the compiled programs (one thread runs
    ``step``; the ``submit_*`` / ``job`` / ``metrics`` methods may be called from other threads)."""

    def __init__(self, model, variables, schedule, config_dict, engine_config: EngineConfig,
                 state_dir: str | None = None, programs: prog.Programs | None = None):
        from dpmjax.workdir import sample_settings

        self.config = engine_config
        self.model, self.schedule, self.model_config = model, schedule, config_dict
        # every program argument is committed to this one device: an uncommitted array where a committed one was
        # seen before makes jax compile the program again (without a new trace)
        self.device = jax.devices()[0]
        self.base = self._put(variables)
        self.image_shape = tuple(config_dict.data.image_shape)
        self.prediction = str(config_dict.train.get("target", "eps"))
        self.num_classes = config_dict.model.get("num_classes")
        settings = sample_settings(config_dict)
        self.default_solver = settings["solver"] if settings["solver"] in prog.ROW_SOLVERS else "dpmpp_2m"
        self.default_nfe = min(int(settings["nfe"]), engine_config.max_nfe)
        self.default_spacing = settings["spacing"]
        self.state_dir = state_dir
        self._grids: dict = {}
        R, K = engine_config.num_rows, engine_config.adapter_slots
        # ``programs``: those of an earlier engine of the same model and shapes (a restarted engine in one process
        # reuses its compiled programs; params are arguments, so nothing is retraced)
        self.num_train_rows = engine_config.max_train_rows or max(1, R // 2)
        self.programs = programs or prog.make_programs(model, schedule, self.prediction, R, self.image_shape,
                                                       conditional=self.num_classes is not None,
                                                       num_train_rows=self.num_train_rows)
        default_times = self._grid(self.default_solver, 1, self.default_spacing)
        self._default_times = default_times
        self.rows = self._put(prog.empty_rows(R, self.image_shape, engine_config.max_nfe, default_times))
        self.row_owner: list = [None] * R            # None (free) or the _Request that owns the row
        # adapter slots: a zero template of the padded adapter tree, stacked K times
        template = init_lora(variables, jax.random.key(0), 1)
        self._zero_adapter = jax.tree.map(lambda leaf: np.zeros((engine_config.max_rank,) + leaf.shape[1:],
                                                                np.float32), template)
        self.stack_host = jax.tree.map(lambda z: np.zeros((K,) + z.shape, np.float32), self._zero_adapter)
        self.scales_host = np.zeros((K,), np.float32)
        self.slot_names: list = [None] * K           # slot 0: base; 1: "<training>"; others: adapter names
        self.slot_names[prog.TRAIN_SLOT] = "<training>"
        self._slot_used = [0.0] * K                  # last use time (least recently used is evicted)
        self._upload_stack()
        # finetuning
        self.jobs: dict = {}
        self.active_job: dict | None = None
        self.train_adapter = None
        self.opt_state = None
        self.accum = None
        self.accum_rows = 0
        self.accum_loss = 0.0
        self._job_data = None
        # queues and metrics
        self._incoming: queue.Queue = queue.Queue()
        self.pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.started = time.time()
        self.durations = {"sample": None, "coserve": None}
        self.completed = collections.deque(maxlen=4096)   # (finish time, latency s, images)
        self.train_steps = collections.deque(maxlen=4096)  # finish time of each finetuning step
        self.iterations = collections.Counter()
        self.row_usage = collections.Counter()            # summed SAMPLING / TRAINING rows over iterations
        self._sequential_samplers: dict = {}
        if state_dir:
            self._recover_jobs()

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_workdir(cls, workdir: str, engine_config: EngineConfig, state_dir: str | None = None,
                     programs: prog.Programs | None = None) -> "Engine":
        """Load a trained workdir (EMA params); FileNotFoundError / ValueError when it does not load."""
        from dpmjax.workdir import checkpoint_steps, load_config_of, load_params

        load_config_of(workdir)
        checkpoint_steps(workdir)
        model, variables, schedule, config = load_params(workdir)
        return cls(model, variables, schedule, config, engine_config,
                   state_dir if state_dir is not None else os.path.join(workdir, "serve"), programs)

    def warm_up(self, repeats: int = 3) -> int:
        """Compile every program and measure both iteration kinds (the last of ``repeats`` calls: the first runs
        of a fresh executable are slower); returns the trace count afterwards."""
        R = self.config.num_rows
        admission = self._admission([False] * R, [prog.FREE] * R)
        self.programs.noise(self._put(jax.random.key(0))).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            self.rows = self._put(self.programs.sample_step(self.base, self.stack, self.scales, self.rows, admission))
            jax.block_until_ready(self.rows.x)
            self.durations["sample"] = time.perf_counter() - start
        if self.config.mode == "coserve":
            adapter = self._put(self._zero_adapter)
            opt_state = self._put(self.programs.init_opt(adapter))
            accum = self._put(jax.tree.map(np.zeros_like, self._zero_adapter))
            train = self._train_rows([], None)
            for repeat in range(max(repeats, 2)):
                start = time.perf_counter()
                self.rows, accum, _, _ = self._put(self.programs.coserve_step(
                    self.base, self.stack, self.scales, adapter, accum, self.rows, admission, train,
                    self._put(jax.random.key(0))))
                jax.block_until_ready(self.rows.x)
                self.durations["coserve"] = time.perf_counter() - start
                if repeat == 0:  # the later calls take the update's outputs, as a running job does
                    adapter, opt_state, accum, _finite = self._put(self.programs.apply_update(
                        adapter, opt_state, accum, self._put(np.float32(0.0))))
        return prog.compile_count(self.programs)

    def request_noise(self, seed: int, num: int):
        """x_T of a request: image j is normal(fold_in(key(seed), j)), whatever rows it lands on."""
        return self.programs.noise(self._put(jax.random.key(seed)))[:num]

    def _put(self, tree):
        """``tree`` committed to the engine's device (no copy for arrays already there). Program outputs go through
        it too: jit returns some outputs uncommitted, and feeding those back would compile the program again."""
        return jax.device_put(tree, self.device)

    # ------------------------------------------------------------------------------------------ validation

    def _grid(self, solver: str, nfe: int, spacing: str) -> np.ndarray:
        """The library's grid for (solver, nfe, spacing) (``dpmjax.samplers.driver.plan``), padded to max_nfe + 1."""
        from dpmjax.samplers.driver import plan

        key = (solver, nfe, spacing)
        cached = self._grids.get(key)
        if cached is not None:
            return cached
        p = plan(self.schedule, solver, nfe=nfe, spacing=spacing)
        if p.final_denoise or p.grid["t"].shape[0] != nfe + 1:
            raise RequestError(422, f"solver {solver!r} at nfe={nfe} needs a final denoising call, which the "
                                    "per-row engine does not run")
        times = np.asarray(p.grid["t"], np.float64)
        padded = np.concatenate([times, np.full(self.config.max_nfe + 1 - len(times), times[-1])]).astype(np.float32)
        self._grids[key] = padded
        return padded

    def parse_sample(self, body) -> SampleSpec:
        """A request body (parsed JSON) -> SampleSpec, or RequestError naming the field."""
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        unknown = sorted(set(body) - _SAMPLE_FIELDS)
        if unknown:
            raise RequestError(422, f"unknown field(s) {unknown}; /sample takes {sorted(_SAMPLE_FIELDS)}")
        num = _int_field(body, "num", 1, 1, self.config.num_rows)
        solver = body.get("solver", self.default_solver)
        if solver not in prog.ROW_SOLVERS:
            raise RequestError(422, f"solver {solver!r} is not served; the engine steps each row on its own and "
                                    f"supports {list(prog.ROW_SOLVERS)}")
        nfe = _int_field(body, "nfe", self.default_nfe, 1, self.config.max_nfe)
        seed = _int_field(body, "seed", 0, 0, 2 ** 31 - 1)
        spacing = body.get("spacing", self.default_spacing)
        fmt = body.get("format", "png")
        if fmt not in ("png", "npz"):
            raise RequestError(422, f"format must be 'png' or 'npz', got {fmt!r}")
        target_ms = body.get("latency_target_ms", self.config.latency_target_s * 1000.0)
        target = _float_field({"latency_target_ms": target_ms}, "latency_target_ms", None, 0.0, 3.6e6) / 1000.0
        labels = self._parse_labels(body, num)
        adapter = body.get("adapter")
        if adapter is not None:
            try:
                store.check_name(adapter)
            except ValueError as err:
                raise RequestError(422, f"adapter: {err}") from None
            if adapter not in self.slot_names and not (self.state_dir and
                                                       os.path.isfile(store.adapter_path(self.state_dir, adapter))):
                raise RequestError(404, f"unknown adapter {adapter!r}; finished adapters: {self.adapter_names()}")
        try:
            self._grid(solver, nfe, spacing)
        except ValueError as err:
            raise RequestError(422, str(err)) from None
        return SampleSpec(num=num, solver=solver, nfe=nfe, seed=seed, labels=labels, adapter=adapter,
                          spacing=spacing, latency_target_s=target, format=fmt)

    def _parse_labels(self, body, num):
        given = body.get("labels", body.get("label"))
        if self.num_classes is None:
            if given is not None:
                raise RequestError(422, "label: this model is unconditional (no num_classes); drop the label")
            return None
        if given is None:
            raise RequestError(422, f"label is required: this model is class-conditional (classes 0.."
                                    f"{self.num_classes - 1})")
        values = given if isinstance(given, list) else [given]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.num_classes
                             for v in values):
            raise RequestError(422, f"label must be a class in 0..{self.num_classes - 1} (or a list of them), got "
                                    f"{given!r}")
        return np.resize(np.asarray(values, np.int32), num)

    def adapter_names(self) -> list[str]:
        if not self.state_dir:
            return []
        folder = os.path.join(self.state_dir, "adapters")
        return sorted(n[:-4] for n in os.listdir(folder) if n.endswith(".npz")) if os.path.isdir(folder) else []

    # ------------------------------------------------------------------------------------------ submission

    def submit_sample(self, spec: SampleSpec, on_done: Callable, arrival: float | None = None) -> str:
        """Queue a validated request; ``on_done(images, error)`` is called from the engine thread."""
        if self._incoming.qsize() + len(self.pending) >= self.config.max_queue:
            raise RequestError(503, f"the queue holds {self.config.max_queue} requests; retry later")
        request = _Request(spec=spec, times=self._grid(spec.solver, spec.nfe, spec.spacing), on_done=on_done,
                           arrival=time.perf_counter() if arrival is None else arrival)
        self._incoming.put(request)
        self._wake.set()
        return request.id

    def submit_finetune(self, body) -> str:
        """Validate a finetuning job, store its spec and data, queue it; returns the job id."""
        if self.config.mode != "coserve":
            raise RequestError(409, f"this server runs mode {self.config.mode!r}: finetuning is not co-served "
                                    "(start it without --mode, or run `dpmjax finetune --method lora` beside it)")
        if not self.state_dir:
            raise RequestError(409, "this engine has no state folder for finetuning jobs")
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        unknown = sorted(set(body) - _FINETUNE_FIELDS)
        if unknown:
            raise RequestError(422, f"unknown field(s) {unknown}; /finetune takes {sorted(_FINETUNE_FIELDS)}")
        try:
            name = store.check_name(body.get("name"))
        except ValueError as err:
            raise RequestError(422, f"name: {err}") from None
        with self._lock:
            taken = name in self.adapter_names() or any(
                j["spec"]["name"] == name and j["state"] in ("queued", "running") for j in self.jobs.values())
        if taken:
            raise RequestError(409, f"an adapter or an unfinished job is already named {name!r}")
        steps = _int_field(body, "steps", 100, 1, self.config.max_steps)
        rank = _int_field(body, "rank", 4, 1, self.config.max_rank)
        alpha = _float_field(body, "alpha", float(rank), 0.0, 1e6)
        lr = _float_field(body, "lr", 2e-3, 0.0, 1e12)
        batch_size = _int_field(body, "batch_size", min(16, self.config.num_rows), 1, 4096)
        seed = _int_field(body, "seed", 0, 0, 2 ** 31 - 1)
        try:
            check_lora(self.base, rank)
        except ValueError as err:
            raise RequestError(422, f"rank: {err}") from None
        images, labels = self._job_images(body)
        job_id = uuid.uuid4().hex[:12]
        spec = dict(name=name, steps=steps, rank=rank, alpha=alpha, lr=lr, batch_size=batch_size, seed=seed,
                    num_images=int(len(images)))
        job = dict(id=job_id, spec=spec, state="queued", step=0, loss=None, error=None, created=time.time())
        folder = store.job_dir(self.state_dir, job_id)
        store.save_arrays(os.path.join(folder, "data.npz"), {"images": images, "labels": labels})
        store.write_json(os.path.join(folder, "job.json"), job)
        with self._lock:
            self.jobs[job_id] = job
        self._wake.set()
        return job_id

    def _job_images(self, body):
        dataset, encoded = body.get("dataset"), body.get("images_npz")
        if (dataset is None) == (encoded is None):
            raise RequestError(422, f"give exactly one of dataset (one of {list(_DATASETS)}) or images_npz (base64 of "
                                    "an .npz with 'images' [N, H, W, C] in [-1, 1] and optional 'labels' [N])")
        if dataset is not None:
            if dataset not in _DATASETS:
                raise RequestError(422, f"unknown dataset {dataset!r}; choose one of {list(_DATASETS)} or send "
                                        "images_npz")
            from dpmjax.data import get_dataset

            source = get_dataset(dataset, "train")
            images, labels = np.asarray(source.images, np.float32), np.asarray(source.labels, np.int32)
            classes = body.get("classes")
            if classes is not None:
                if not isinstance(classes, list) or not classes or any(
                        isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < 10 for c in classes):
                    raise RequestError(422, f"classes must be a non-empty list of digits 0..9, got {classes!r}")
                keep = np.isin(labels, classes)
                images, labels = images[keep], labels[keep]
        else:
            if body.get("classes") is not None:
                raise RequestError(422, "classes filters a named dataset; drop it with images_npz")
            images, labels = _decode_images(encoded)
        if images.shape[1:] != self.image_shape:
            raise RequestError(422, f"images must be [N, {', '.join(map(str, self.image_shape))}] for this model, "
                                    f"got {list(images.shape)}")
        if self.num_classes is not None and (labels is None or np.any((labels < 0) | (labels >= self.num_classes))):
            raise RequestError(422, f"this model is class-conditional: images_npz needs 'labels' in 0.."
                                    f"{self.num_classes - 1}")
        labels = np.zeros((len(images),), np.int32) if labels is None else labels
        return images, labels

    def job(self, job_id: str) -> dict | None:
        with self._lock:
            job = self.jobs.get(job_id)
            return None if job is None else {k: job[k] for k in ("id", "state", "step", "loss", "error", "spec")}

    # ------------------------------------------------------------------------------------------ adapter slots

    @property
    def stack(self):
        return self._stack_device

    @property
    def scales(self):
        return self._scales_device

    def _upload_stack(self):
        self._stack_device = self._put(self.stack_host)
        self._scales_device = self._put(self.scales_host)

    def _slot_for(self, adapter: str | None, busy_slots: set) -> int | None:
        """The slot holding ``adapter`` (loading it into a free or least recently used slot), None when every
        adapter slot is in use by in-flight rows."""
        if adapter is None:
            return 0
        if adapter in self.slot_names:
            return self.slot_names.index(adapter)
        candidates = [k for k in range(2, self.config.adapter_slots) if k not in busy_slots]
        if not candidates:
            return None
        k = min(candidates, key=lambda s: (self.slot_names[s] is not None, self._slot_used[s]))
        arrays = store.load_arrays(store.adapter_path(self.state_dir, adapter))
        adapter_tree = store.unflatten_tree(arrays, "adapter")
        self.stack_host = jax.tree.map(lambda s, a: _set_slot(s, k, a), self.stack_host, adapter_tree)
        self.scales_host[k] = float(arrays["scale"])
        self.slot_names[k] = adapter
        self._upload_stack()
        return k

    # ------------------------------------------------------------------------------------------ jobs

    def _recover_jobs(self):
        """Unfinished jobs of an earlier run resume (from their checkpoint) in creation order."""
        for job in store.list_jobs(self.state_dir):
            if job["state"] == "running":
                job["state"] = "queued"
            self.jobs[job["id"]] = job

    def _start_next_job(self):
        with self._lock:
            queued = [j for j in self.jobs.values() if j["state"] == "queued"]
        if not queued:
            return
        job = min(queued, key=lambda j: (j["created"], j["id"]))
        spec, folder = job["spec"], store.job_dir(self.state_dir, job["id"])
        data = store.load_arrays(os.path.join(folder, "data.npz"))
        self._job_data = (data["images"].astype(np.float32), data["labels"].astype(np.int32))
        adapter = _pad_rank(init_lora(self.base, jax.random.key(spec["seed"]), spec["rank"]), self.config.max_rank)
        adapter = self._put(adapter)
        opt_state = self._put(self.programs.init_opt(adapter))
        step, loss = 0, None
        checkpoint = os.path.join(folder, "checkpoint.npz")
        if os.path.isfile(checkpoint):
            arrays = store.load_arrays(checkpoint)
            adapter = self._put(store.unflatten_tree(arrays, "adapter"))
            adam_state = opt_state[0]._replace(count=self._put(arrays["count"].astype(np.int32)),
                                               mu=self._put(store.unflatten_tree(arrays, "mu")),
                                               nu=self._put(store.unflatten_tree(arrays, "nu")))
            opt_state = (adam_state,) + tuple(opt_state[1:])  # chain(scale_by_adam, scale(-1)): Adam's state first
            step, loss = int(arrays["step"]), float(arrays["loss"])
        self.train_adapter, self.opt_state = adapter, opt_state
        self.accum = self._put(jax.tree.map(np.zeros_like, self._zero_adapter))
        self.accum_rows, self.accum_loss = 0, 0.0
        self.scales_host[prog.TRAIN_SLOT] = spec["alpha"] / spec["rank"]
        self._upload_stack()
        self._update_job(job, state="running", step=step, loss=loss)
        self.active_job = job

    def _update_job(self, job, **fields):
        with self._lock:
            job.update(fields)
            snapshot = dict(job)
        store.write_json(os.path.join(store.job_dir(self.state_dir, job["id"]), "job.json"), snapshot)

    def _checkpoint_job(self, job):
        adam_state = self.opt_state[0]  # chain(scale_by_adam, scale(-1)): Adam's state first
        arrays = {**store.flatten_tree(jax.device_get(self.train_adapter), "adapter"),
                  **store.flatten_tree(jax.device_get(adam_state.mu), "mu"),
                  **store.flatten_tree(jax.device_get(adam_state.nu), "nu"),
                  "count": np.asarray(adam_state.count), "step": np.asarray(job["step"]),
                  "loss": np.asarray(job["loss"], np.float64)}
        store.save_arrays(os.path.join(store.job_dir(self.state_dir, job["id"]), "checkpoint.npz"), arrays)

    def _finish_job(self, job, error: str | None = None):
        if error is None:
            self._checkpoint_job(job)
            arrays = {**store.flatten_tree(jax.device_get(self.train_adapter), "adapter"),
                      "scale": np.asarray(self.scales_host[prog.TRAIN_SLOT]),
                      "rank": np.asarray(job["spec"]["rank"])}
            store.save_arrays(store.adapter_path(self.state_dir, job["spec"]["name"]), arrays)
            self._update_job(job, state="done")
        else:
            self._update_job(job, state="failed", error=error)
        self.active_job, self.train_adapter, self.opt_state, self.accum, self._job_data = None, None, None, None, None
        self.scales_host[prog.TRAIN_SLOT] = 0.0
        self._upload_stack()

    # ------------------------------------------------------------------------------------------ iteration

    def busy(self) -> bool:
        with self._lock:
            queued_job = any(j["state"] == "queued" for j in self.jobs.values())
        return bool(self.pending) or not self._incoming.empty() or any(o is not None for o in self.row_owner) \
            or self.active_job is not None or (queued_job and self.config.mode == "coserve")

    def run(self, stop: threading.Event):
        """The engine thread: iterate while there is work, otherwise sleep until a submission wakes it. An
        unexpected error fails the requests and the job of that iteration (their clients get a 500 naming it)
        and the loop goes on, so one bad iteration does not take the server down."""
        while not stop.is_set():
            if self.busy():
                try:
                    self.step()
                except Exception as err:  # noqa: BLE001 - reported to the affected clients, then serve on
                    import traceback

                    traceback.print_exc()
                    self._fail_inflight(f"internal error in the engine iteration: {type(err).__name__}: {err}")
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def _fail_inflight(self, message: str):
        """Complete every in-flight request with ``message``, free all rows, fail the active job."""
        requests = {id(o): o for o in self.row_owner if o is not None}.values()
        self.row_owner = [None] * self.config.num_rows
        for request in requests:
            request.on_done(None, message)
        if self.active_job is not None:
            self._finish_job(self.active_job, error=message)

    def step(self):
        """One iteration: admit, decide training rows, run one program, hand out finished requests and steps."""
        while not self._incoming.empty():
            self.pending.append(self._incoming.get_nowait())
        if self.config.mode == "sequential":
            return self._step_sequential()
        if self.config.mode == "coserve" and self.active_job is None:
            self._start_next_job()
        admitted = self._admit_pending()
        now = time.perf_counter()
        train_count = self._training_rows(now)
        R = self.config.num_rows
        free = [r for r in range(R) if self.row_owner[r] is None]
        train_rows = free[:train_count]
        kinds = [prog.SAMPLING if self.row_owner[r] is not None else prog.FREE for r in range(R)]
        for r in train_rows:
            kinds[r] = prog.TRAINING
        mask = [False] * R
        for request in admitted:
            for r in request.rows:
                mask[r] = True
        admission = self._admission(mask, kinds, admitted)
        sampling_rows = sum(k == prog.SAMPLING for k in kinds)
        start = time.perf_counter()
        if train_rows:
            train = self._train_rows(train_rows, self.active_job)
            key = self._put(jax.random.fold_in(jax.random.fold_in(jax.random.key(self.active_job["spec"]["seed"]),
                                                                  self.active_job["step"]), self.accum_rows))
            self.rows, self.accum, loss_sum, _ = self._put(self.programs.coserve_step(
                self.base, self.stack, self.scales, self.train_adapter, self.accum, self.rows, admission, train, key))
            loss_sum = float(loss_sum)  # waits for the program
            kind = "coserve"
        else:
            self.rows = self._put(self.programs.sample_step(self.base, self.stack, self.scales, self.rows, admission))
            jax.block_until_ready(self.rows.step)
            kind = "sample"
        elapsed = time.perf_counter() - start
        previous = self.durations[kind]
        self.durations[kind] = elapsed if previous is None else (1 - _EMA) * previous + _EMA * elapsed
        self.iterations[kind] += 1
        self.row_usage["sampling"] += sampling_rows
        self.row_usage["training"] += len(train_rows)
        self._finish_sampling_rows()
        if train_rows:
            self._after_training_rows(len(train_rows), loss_sum)

    def _admit_pending(self) -> list:
        admitted = []
        free = [r for r in range(self.config.num_rows) if self.row_owner[r] is None]
        busy_slots = {req.slot for req in self.row_owner if req is not None}
        while self.pending:
            request = self.pending[0]
            if request.spec.num > len(free):
                break
            try:
                slot = self._slot_for(request.spec.adapter, busy_slots)
            except (OSError, ValueError, KeyError) as err:  # the adapter file vanished or is damaged
                self.pending.popleft()
                request.on_done(None, f"adapter {request.spec.adapter!r} could not be loaded: {err}")
                continue
            if slot is None:
                break
            self.pending.popleft()
            request.slot, request.rows = slot, free[:request.spec.num]
            free = free[request.spec.num:]
            busy_slots.add(slot)
            self._slot_used[slot] = time.perf_counter()
            for r in request.rows:
                self.row_owner[r] = request
            admitted.append(request)
        return admitted

    def _training_rows(self, now: float) -> int:
        """The scheduler rule (module docstring): how many free rows the active job takes this iteration."""
        job = self.active_job
        if job is None:
            return 0
        free = sum(o is None for o in self.row_owner)
        need = job["spec"]["batch_size"] - self.accum_rows
        cap = self.num_train_rows
        count = min(free, need, cap)
        inflight = {id(o): o for o in self.row_owner if o is not None}.values()
        t_co, t_s = self.durations["coserve"], self.durations["sample"]
        if count > 0 and inflight and t_co is not None and t_s is not None:
            for request in inflight:
                left = request.spec.nfe - request.steps_done
                if now + left * t_co > request.deadline >= now + left * t_s:
                    return 0
        return max(count, 0)

    def _admission(self, mask, kinds, admitted=()):
        R, shape = self.config.num_rows, self.image_shape
        x = np.zeros((R,) + shape, np.float32)
        times = np.broadcast_to(self._default_times, (R, self.config.max_nfe + 1)).copy()
        num_steps = np.ones((R,), np.int32)
        solver = np.zeros((R,), np.int32)
        slot = np.zeros((R,), np.int32)
        label = np.zeros((R,), np.int32)
        for request in admitted:
            spec = request.spec
            noise = np.asarray(self.request_noise(spec.seed, spec.num))
            for j, r in enumerate(request.rows):
                x[r], times[r], num_steps[r] = noise[j], request.times, spec.nfe
                solver[r], slot[r] = prog.ROW_SOLVERS.index(spec.solver), request.slot
                label[r] = 0 if spec.labels is None else spec.labels[j]
        return self._put(prog.Admission(mask=np.asarray(mask, bool), kind=np.asarray(kinds, np.int32), slot=slot, x=x,
                                        times=times, num_steps=num_steps, solver=solver, label=label))

    def _train_rows(self, rows, job):
        R = self.num_train_rows
        images = np.zeros((R,) + self.image_shape, np.float32)
        labels = np.zeros((R,), np.int32)
        weight = np.zeros((R,), np.float32)
        if rows:
            data_images, data_labels = self._job_data
            spec = job["spec"]
            rng = np.random.default_rng((spec["seed"], job["step"]))
            order = rng.choice(len(data_images), spec["batch_size"], replace=len(data_images) < spec["batch_size"])
            picks = order[self.accum_rows:self.accum_rows + len(rows)]
            for slot, i in enumerate(picks):
                images[slot], labels[slot], weight[slot] = data_images[i], data_labels[i], 1.0 / spec["batch_size"]
        return self._put(prog.TrainRows(images=images, label=labels, weight=weight))

    def _finish_sampling_rows(self):
        finished = []
        for request in {id(o): o for o in self.row_owner if o is not None}.values():
            request.steps_done += 1
            if request.steps_done >= request.spec.nfe:
                finished.append(request)
        if not finished:
            return
        x = np.asarray(jax.device_get(self.rows.x))
        now = time.perf_counter()
        for request in finished:
            images = x[request.rows].copy()
            for r in request.rows:
                self.row_owner[r] = None
            self._complete(request, images, now)

    def _complete(self, request, images, now):
        error = None
        if not np.all(np.isfinite(images)):
            images, error = None, "the sample is not finite (NaN/inf); the model or adapter diverged"
        else:
            images = np.clip(images, -1.0, 1.0)
        with self._lock:
            self.completed.append((time.time(), now - request.arrival, request.spec.num))
        request.on_done(images, error)

    def _after_training_rows(self, count: int, loss_sum: float):
        job = self.active_job
        self.accum_rows += count
        self.accum_loss += loss_sum
        if self.accum_rows < job["spec"]["batch_size"]:
            return
        loss = self.accum_loss
        self.train_adapter, self.opt_state, self.accum, finite = self._put(self.programs.apply_update(
            self.train_adapter, self.opt_state, self.accum, self._put(np.float32(job["spec"]["lr"]))))
        self.accum_rows, self.accum_loss = 0, 0.0
        if not (math.isfinite(loss) and bool(finite)):
            what = f"loss {loss}" if not math.isfinite(loss) else "the adapter"
            self._finish_job(job, error=f"diverged at step {job['step'] + 1}: {what} is not finite (NaN/inf); "
                                        f"lower lr (was {job['spec']['lr']:g})")
            return
        with self._lock:  # job.json is rewritten at checkpoints and state changes, not at every step
            job.update(step=job["step"] + 1, loss=loss)
            self.train_steps.append(time.time())
        if job["step"] >= job["spec"]["steps"]:
            self._finish_job(job)
        elif job["step"] % self.config.checkpoint_every == 0:
            self._checkpoint_job(job)
            self._update_job(job)

    # ------------------------------------------------------------------------------------------ sequential mode

    def _step_sequential(self):
        """Baseline without batching: the oldest request alone through the library's compiled sampler."""
        import dpmjax
        from dpmjax.nn import make_apply_fn

        if not self.pending:
            return
        request = self.pending.popleft()
        spec = request.spec
        key = (spec.solver, spec.nfe, spec.spacing, spec.num)
        sampler = self._sequential_samplers.get(key)
        if sampler is None:
            apply_fn = make_apply_fn(self.model, self.schedule)
            sampler = dpmjax.make_param_sampler(apply_fn, schedule=self.schedule, solver=spec.solver, nfe=spec.nfe,
                                                spacing=spec.spacing, prediction=self.prediction)
            self._sequential_samplers[key] = sampler
        params = self.base
        if spec.adapter is not None:
            arrays = store.load_arrays(store.adapter_path(self.state_dir, spec.adapter))
            scale = float(arrays["scale"])
            params = merge_lora(self.base, store.unflatten_tree(arrays, "adapter"), alpha=scale, rank=1)
        x_T = self.request_noise(spec.seed, spec.num)
        cond = {} if spec.labels is None else {"y": jnp.asarray(spec.labels)}
        images = np.asarray(sampler(params, x_T, **cond))
        self.iterations["sequential"] += 1
        self._complete(request, images, time.perf_counter())

    # ------------------------------------------------------------------------------------------ metrics

    def metrics(self, window_s: float = 60.0) -> dict:
        now = time.time()
        with self._lock:
            recent = [c for c in self.completed if c[0] >= now - window_s]
            steps = [s for s in self.train_steps if s >= now - window_s]
            latencies = sorted(c[1] for c in self.completed)
            jobs = collections.Counter(j["state"] for j in self.jobs.values())
        span = max(min(window_s, now - self.started), 1e-9)
        q = (lambda p: float(np.quantile(latencies, p)) if latencies else float("nan"))
        iterations = sum(self.iterations.values())
        return {
            "queue_depth": len(self.pending) + self._incoming.qsize(),
            "inflight_requests": len({id(o) for o in self.row_owner if o is not None}),
            "latency_p50_seconds": q(0.5), "latency_p99_seconds": q(0.99),
            "images_per_second": sum(c[2] for c in recent) / span,
            "finetune_steps_per_second": len(steps) / span,
            "requests_completed_total": len(self.completed),
            "compilations_total": prog.compile_count(self.programs),
            "iterations_total": dict(self.iterations),
            "row_utilisation": {k: v / max(iterations * self.config.num_rows, 1) for k, v in self.row_usage.items()},
            "jobs": {state: jobs.get(state, 0) for state in JOB_STATES},
            "iteration_seconds": {k: v for k, v in self.durations.items() if v is not None},
        }


def _set_slot(stacked: np.ndarray, k: int, value) -> np.ndarray:
    out = stacked.copy()
    out[k] = np.asarray(value, np.float32)
    return out


def _pad_rank(adapter, max_rank: int):
    """Zero rows appended to A [r, in] and B [r, out] up to ``max_rank`` (the same A^T B)."""
    def pad(leaf):
        leaf = np.asarray(leaf, np.float32)
        return np.concatenate([leaf, np.zeros((max_rank - leaf.shape[0],) + leaf.shape[1:], np.float32)])
    return jax.tree.map(pad, adapter)


def _decode_images(encoded):
    import base64
    import binascii
    import io

    if not isinstance(encoded, str):
        raise RequestError(422, "images_npz must be a base64 string of an .npz file")
    try:
        raw = base64.b64decode(encoded, validate=True)
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            if "images" not in data.files:
                raise RequestError(422, f"images_npz holds {data.files}; it needs 'images'")
            images = np.asarray(data["images"], np.float32)
            labels = np.asarray(data["labels"], np.int32) if "labels" in data.files else None
    except (binascii.Error, ValueError, OSError) as err:
        if isinstance(err, RequestError):
            raise
        raise RequestError(422, f"images_npz is not a base64 .npz file: {err}") from None
    if images.ndim != 4 or not len(images) or not np.all(np.isfinite(images)) or np.abs(images).max() > 1.0 + 1e-6:
        raise RequestError(422, f"images must be a non-empty finite [N, H, W, C] array in [-1, 1], got shape "
                                f"{list(images.shape)}")
    if labels is not None and labels.shape != images.shape[:1]:
        raise RequestError(422, f"labels must be [N] = [{len(images)}], got {list(labels.shape)}")
    return images, labels
