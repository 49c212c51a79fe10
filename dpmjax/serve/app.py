"""The HTTP face of the co-serving engine (``dpmjax serve``): Starlette routes run by uvicorn.

    POST /sample     {"num": 4, "solver": "dpmpp_2m", "nfe": 10, "seed": 0, "label": 3, "adapter": "threes",
                      "format": "png" | "npz", "latency_target_ms": 2000}       -> a PNG grid or an npz (images)
    POST /finetune   {"name": "threes", "dataset": "digits", "classes": [3] | "images_npz": BASE64,
                      "steps": 200, "rank": 4, "lr": 0.002, "batch_size": 16}     -> {"job": ID}
    GET  /jobs/{id}  {"state": queued|running|done|failed, "step", "loss", "error", "spec"}
    GET  /metrics    Prometheus text: queue depth, latency p50/p99, images/s, finetuning steps/s, compilations
    GET  /health     {"status": "ok", "mode": ...}

Why Starlette + uvicorn: a small ASGI framework with typed Request / Response classes and nothing else to
configure, and uvicorn runs it in one asyncio loop; handlers only validate, queue and await, while the engine's
compiled iterations run in one separate thread (``Engine.run``), so a slow iteration never blocks the loop that
accepts and rejects requests. A finished request wakes its handler with ``loop.call_soon_threadsafe``.

Errors are JSON ``{"error": message}`` with a 4xx status: 400 malformed JSON, 404 unknown adapter or job, 409
finetuning on a server that does not co-serve or a name already taken, 413 a body above ``max_body_bytes``
(checked from Content-Length and again while reading), 422 a field out of range (the message names it and the
allowed values), 503 a full queue. A refused request never reaches the engine, so in-flight requests are
undisturbed.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import threading

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dpmjax.serve.engine import Engine, RequestError

__all__ = ["build_app", "png_grid", "prometheus_text", "EngineThread", "DEFAULT_MAX_BODY_BYTES"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


def png_grid(images, columns: int = 8) -> bytes:
    """PNG bytes of a grid of images in [-1, 1] ([N, H, W, C], C = 1 or 3), upscaled so 8x8 digits are visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = (np.asarray(images, np.float32) + 1.0) / 2.0
    n, h, w, c = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    canvas = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, columns)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img
    scale = max(1, 32 // h)
    canvas = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    plt.imsave(buffer, canvas[..., 0] if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
               format="png")
    return buffer.getvalue()


def prometheus_text(metrics: dict) -> str:
    """The engine's metrics in Prometheus' text exposition format (version 0.0.4)."""
    lines = []

    def gauge(name, help_, value, kind="gauge", labels=None):
        if not any(line.startswith(f"# HELP dpmjax_serve_{name} ") for line in lines):
            lines.append(f"# HELP dpmjax_serve_{name} {help_}")
            lines.append(f"# TYPE dpmjax_serve_{name} {kind}")
        label = "" if not labels else "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        value = float(value)
        lines.append(f"dpmjax_serve_{name}{label} {'NaN' if math.isnan(value) else repr(value)}")

    gauge("queue_depth", "sampling requests waiting for rows", metrics["queue_depth"])
    gauge("inflight_requests", "sampling requests being stepped", metrics["inflight_requests"])
    gauge("latency_seconds", "request latency (arrival to last step) over recent requests",
          metrics["latency_p50_seconds"], "summary", {"quantile": "0.5"})
    gauge("latency_seconds", "", metrics["latency_p99_seconds"], "summary", {"quantile": "0.99"})
    gauge("images_per_second", "images finished per second over the last minute", metrics["images_per_second"])
    gauge("finetune_steps_per_second", "finetuning (Adam) steps per second over the last minute",
          metrics["finetune_steps_per_second"])
    gauge("requests_completed_total", "sampling requests finished", metrics["requests_completed_total"], "counter")
    gauge("compilations_total", "traces of the engine's jitted programs (constant after start-up)",
          metrics["compilations_total"], "counter")
    for kind, count in sorted(metrics["iterations_total"].items()):
        gauge("iterations_total", "engine iterations by program", count, "counter", {"program": kind})
    for kind, share in sorted(metrics["row_utilisation"].items()):
        gauge("row_utilisation", "share of all rows used, by row kind", share, labels={"kind": kind})
    for state, count in sorted(metrics["jobs"].items()):
        gauge("jobs", "finetuning jobs by state", count, labels={"state": state})
    for kind, seconds in sorted(metrics["iteration_seconds"].items()):
        gauge("iteration_seconds", "recent iteration duration (EMA) by program", seconds, labels={"program": kind})
    return "\n".join(lines) + "\n"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_json(request: Request, max_body_bytes: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise RequestError(413, f"the body has {declared} bytes; the limit is {max_body_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise RequestError(413, f"the body exceeds the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON: {err}") from None


class EngineThread:
    """The engine's iteration loop in a daemon thread (started and stopped with the application)."""

    def __init__(self, engine: Engine):
        self.engine, self.stop = engine, threading.Event()
        self.thread = threading.Thread(target=engine.run, args=(self.stop,), name="dpmjax-engine", daemon=True)

    def start(self):
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=30)


def build_app(engine: Engine, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, run_engine: bool = True) -> Starlette:
    """The Starlette application over ``engine``; with ``run_engine`` its thread starts and stops with the app."""
    worker = EngineThread(engine)

    async def sample(request: Request):
        try:
            spec = engine.parse_sample(await _read_json(request, max_body_bytes))
            loop = asyncio.get_running_loop()
            done: asyncio.Future = loop.create_future()

            def on_done(images, error):
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result((images, error)))

            engine.submit_sample(spec, on_done)
        except RequestError as err:
            return _error(err.status, str(err))
        images, error = await done
        if error is not None:
            return _error(500, error)
        if spec.format == "npz":
            buffer = io.BytesIO()
            extra = {} if spec.labels is None else {"labels": spec.labels}
            np.savez(buffer, images=images, solver=spec.solver, nfe=spec.nfe, seed=spec.seed, **extra)
            return Response(buffer.getvalue(), media_type="application/octet-stream")
        return Response(png_grid(images), media_type="image/png")

    async def finetune(request: Request):
        try:
            body = await _read_json(request, max_body_bytes)
            job_id = await asyncio.get_running_loop().run_in_executor(None, engine.submit_finetune, body)
        except RequestError as err:
            return _error(err.status, str(err))
        return JSONResponse({"job": job_id}, status_code=202)

    async def job(request: Request):
        status = engine.job(request.path_params["job_id"])
        if status is None:
            return _error(404, f"unknown job {request.path_params['job_id']!r}")
        return JSONResponse(status)

    async def metrics(request: Request):
        return PlainTextResponse(prometheus_text(engine.metrics()), media_type="text/plain; version=0.0.4")

    async def health(request: Request):
        return JSONResponse({"status": "ok", "mode": engine.config.mode, "rows": engine.config.num_rows})

    async def not_found(request: Request, exc):
        return _error(getattr(exc, "status_code", 404), f"{request.method} {request.url.path}: "
                                                         f"{getattr(exc, 'detail', 'not found')}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if run_engine:
            worker.start()
        try:
            yield
        finally:
            if run_engine:
                worker.close()

    routes = [Route("/sample", sample, methods=["POST"]), Route("/finetune", finetune, methods=["POST"]),
              Route("/jobs/{job_id}", job, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})


def serve(workdir: str, *, host: str = "127.0.0.1", port: int = 8000, state_dir: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "warning", ready=None, **engine_options):
    """Load ``workdir``, compile the engine's programs, then bind ``host:port`` and serve until interrupted.

    Everything that can fail on the user's side (the workdir, the options) fails before the port is bound.
    ``ready(engine)``, if given, is called once the programs are compiled (the CLI prints the address there)."""
    import uvicorn

    from dpmjax.serve.engine import EngineConfig

    engine_config = EngineConfig(**engine_options)
    engine = Engine.from_workdir(workdir, engine_config, state_dir=state_dir)
    engine.warm_up()
    if ready is not None:
        ready(engine)
    app = build_app(engine, max_body_bytes=max_body_bytes)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")).run()
