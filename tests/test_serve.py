"""Co-serving engine and HTTP server (dpmjax/serve): parity with the library sampler, no recompilation under
continuous batching, training rows that touch only the adapter, a diverging job stopped while sampling continues,
resumption after a restart, and the HTTP error contract.

One engine (8 rows, NFE <= 8) on the session's tiny digits teacher serves every test; its programs compile once.
"""
import asyncio
import base64
import io
import os
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.data import get_dataset
from dpmjax.nn import make_model_fn, network_time
from dpmjax.serve import programs as prog
from dpmjax.serve import store
from dpmjax.serve.engine import Engine, EngineConfig, RequestError

ROWS, MAX_NFE = 8, 8
# float32 parity: the engine's iteration and the library's lax.scan are different XLA programs (other fusions, and
# per-row weights as grouped convolutions for adapter rows), so each model call differs in the last ulps and the
# solver steps carry that on: measured up to ~2.2e-5 on images in [-1, 1]; a wrong grid, order or step index errs
# by 1e-2 and more.
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(digits_teacher, tmp_path_factory):
    workdir, _ = digits_teacher
    state_dir = str(tmp_path_factory.mktemp("serve_state"))
    # max_train_rows = ROWS: a batch-8 finetuning step fits one idle iteration (fewer iterations per test)
    eng = Engine.from_workdir(workdir, EngineConfig(num_rows=ROWS, max_nfe=MAX_NFE, checkpoint_every=2,
                                                    max_train_rows=ROWS), state_dir=state_dir)
    eng.warm_up(repeats=1)
    return eng


def _run(engine, requests, *, max_iterations=500, join_after=None):
    """Submit (body, join_at) requests, stepping the engine until idle; returns {index: (images, error)}."""
    results = {}
    waiting = sorted(enumerate(requests), key=lambda item: item[1][1])
    iteration = 0
    while waiting or engine.busy():
        while waiting and waiting[0][1][1] <= iteration:
            index, (body, _) = waiting.pop(0)
            engine.submit_sample(engine.parse_sample(body),
                                 lambda images, error, i=index: results.__setitem__(i, (images, error)))
        if engine.busy():
            engine.step()
        iteration += 1
        assert iteration < max_iterations, "the engine did not finish"
        if join_after is not None:
            join_after(iteration)
    return results


def _library(engine, body, adapter=None):
    """The same request through dpmjax.sample (the closure form of the library sampler)."""
    spec = engine.parse_sample(body)
    variables = engine.base if adapter is None else prog.merge_scaled(engine.base, *adapter)
    model_fn = make_model_fn(engine.model, variables, engine.schedule)
    x_T = engine.request_noise(spec.seed, spec.num)
    out = dpmjax.sample(model_fn, x_T, schedule=engine.schedule, solver=spec.solver, nfe=spec.nfe,
                        spacing=spec.spacing, prediction=engine.prediction)
    return np.clip(np.asarray(out), -1.0, 1.0)


def test_engine_matches_library_and_never_recompiles(engine):
    """Requests with different solvers and NFEs join at different steps; each matches dpmjax.sample on the same
    noise, and no program is traced again."""
    traces = prog.compile_count(engine.programs)
    bodies = [({"num": 3, "solver": "dpmpp_2m", "nfe": 6, "seed": 1}, 0),
              ({"num": 2, "solver": "ddim", "nfe": 5, "seed": 2}, 2),
              ({"num": 3, "solver": "dpmpp_2m", "nfe": 8, "seed": 3}, 3),   # waits for rows: 3 + 2 + 3 = 8
              ({"num": 1, "solver": "dpmpp_2m", "nfe": 3, "seed": 4}, 4)]   # lower-order final at NFE < 15
    results = _run(engine, bodies)
    for index, (body, _) in enumerate(bodies):
        images, error = results[index]
        assert error is None
        # float32: the per-row network (grouped convolutions) and the batched one differ in the last ulps
        np.testing.assert_allclose(images, _library(engine, body), atol=PARITY_ATOL, rtol=0)
    assert prog.compile_count(engine.programs) == traces


def test_refusals_name_the_field(engine):
    for body, status, words in [({"solver": "unipc"}, 422, "['ddim', 'dpmpp_2m']"),
                                ({"nfe": MAX_NFE + 1}, 422, "nfe"), ({"num": ROWS + 1}, 422, "num"),
                                ({"adapter": "nope"}, 404, "unknown adapter"), ({"label": 3}, 422, "unconditional"),
                                ({"color": "red"}, 422, "unknown field"), ([1, 2], 400, "JSON object")]:
        with pytest.raises(RequestError, match=r".*") as info:
            engine.parse_sample(body)
        assert info.value.status == status and words in str(info.value), (body, str(info.value))


def _denoising_loss(engine, variables, images):
    """The mean eps-regression loss of ``variables`` on ``images`` with fixed times and noise."""
    key_t, key_noise = jax.random.split(jax.random.key(7))
    t = jax.random.uniform(key_t, (len(images),), jnp.float32, 0.05, 0.95)
    noise = jax.random.normal(key_noise, images.shape, jnp.float32)
    alpha = engine.schedule.alpha(t)[:, None, None, None]
    sigma = engine.schedule.sigma(t)[:, None, None, None]
    out = engine.model.apply(variables, alpha * images + sigma * noise, network_time(engine.schedule, t), train=False)
    return float(jnp.mean((out - noise) ** 2))


def test_training_rows_change_only_the_adapter_and_lower_the_loss(engine):
    """A job on uploaded images (inverted 3s, far from the teacher's data) is co-served beside base-network
    requests: the requests still match the library, the base params stay bit-identical, the adapter's padding
    stays zero, and the adapted network's denoising loss on those images drops well below the teacher's."""
    source = get_dataset("digits", "train")
    inverted = -np.asarray(source.images, np.float32)[np.asarray(source.labels) == 3][:32]
    buffer = io.BytesIO()
    np.savez(buffer, images=inverted)
    base_before = jax.tree.map(np.array, engine.base)
    job_id = engine.submit_finetune({"name": "threes", "images_npz": base64.b64encode(buffer.getvalue()).decode(),
                                     "steps": 30, "batch_size": 8, "lr": 1e-2, "rank": 2})
    bodies = [({"num": 2, "solver": "dpmpp_2m", "nfe": 8, "seed": s}, 3 * s) for s in range(4)]
    results = _run(engine, bodies)
    job = engine.job(job_id)
    assert job["state"] == "done" and job["step"] == 30, job
    assert engine.metrics()["row_utilisation"]["training"] > 0
    for index, (body, _) in enumerate(bodies):  # base-network requests served beside the training rows
        np.testing.assert_allclose(results[index][0], _library(engine, body), atol=PARITY_ATOL, rtol=0)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(engine.base), base_before)
    arrays = store.load_arrays(store.adapter_path(engine.state_dir, "threes"))
    adapter = store.unflatten_tree(arrays, "adapter")
    # rank 2 padded to max rank: the padding rows stay exactly zero
    for leaf in jax.tree.leaves(adapter):
        assert np.all(leaf[2:] == 0) and np.any(leaf[:2] != 0)
    tuned = prog.merge_scaled(engine.base, adapter, float(arrays["scale"]))
    # measured 0.237 -> 0.123 for the teacher of tiny_configs; an adapter that does not learn stays at ~1.0x
    assert _denoising_loss(engine, tuned, jnp.asarray(inverted)) < 0.75 * _denoising_loss(engine, engine.base,
                                                                                            jnp.asarray(inverted))
    # the finished adapter is sampled by name, and equals the library sampler on the merged weights
    body = {"num": 2, "solver": "ddim", "nfe": 4, "seed": 9, "adapter": "threes"}
    (images_out, error), = _run(engine, [(body, 0)]).values()
    assert error is None
    np.testing.assert_allclose(images_out, _library(engine, body, (adapter, float(arrays["scale"]))), atol=PARITY_ATOL)


def test_diverging_job_fails_while_sampling_continues(engine):
    traces = prog.compile_count(engine.programs)
    job_id = engine.submit_finetune({"name": "boom", "dataset": "digits", "steps": 50, "batch_size": 4,
                                     "lr": 1e9})
    bodies = [({"num": 2, "solver": "ddim", "nfe": 6, "seed": s}, 2 * s) for s in range(3)]
    results = _run(engine, bodies)
    job = engine.job(job_id)
    assert job["state"] == "failed" and "not finite" in job["error"] and job["step"] < 50, job
    assert "boom" not in engine.adapter_names()
    for index, (body, _) in enumerate(bodies):
        assert results[index][1] is None
        np.testing.assert_allclose(results[index][0], _library(engine, body), atol=PARITY_ATOL, rtol=0)
    assert prog.compile_count(engine.programs) == traces


def test_restart_resumes_job_from_its_checkpoint(engine):
    job_id = engine.submit_finetune({"name": "resumed", "dataset": "digits", "classes": [7], "steps": 6,
                                     "batch_size": 8, "lr": 3e-3})
    while engine.job(job_id)["step"] < 3:   # checkpoint_every=2: step 2 is on disk, step 3 is not
        engine.step()
    checkpoint = store.load_arrays(os.path.join(store.job_dir(engine.state_dir, job_id), "checkpoint.npz"))
    assert int(checkpoint["step"]) == 2
    # "crash": a new engine on the same state folder (same compiled programs), the old one is dropped
    restarted = Engine(engine.model, engine.base, engine.schedule, engine.model_config, engine.config,
                       state_dir=engine.state_dir, programs=engine.programs)
    assert restarted.job(job_id)["state"] == "queued"
    restarted.durations = dict(engine.durations)
    restarted._start_next_job()
    assert restarted.job(job_id)["state"] == "running" and restarted.job(job_id)["step"] == 2
    resumed_adapter = jax.device_get(restarted.train_adapter)
    jax.tree.map(np.testing.assert_array_equal, resumed_adapter, store.unflatten_tree(checkpoint, "adapter"))
    while restarted.busy():
        restarted.step()
    assert restarted.job(job_id)["state"] == "done" and restarted.job(job_id)["step"] == 6
    assert "resumed" in restarted.adapter_names()
    engine.jobs[job_id] = restarted.jobs[job_id]   # the module's engine no longer owns this job
    engine.active_job, engine.train_adapter = None, None


# ------------------------------------------------------------------------------------------ HTTP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(engine):
    import uvicorn

    from dpmjax.serve.app import build_app

    port = _free_port()
    app = build_app(engine, max_body_bytes=64 * 1024)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


def test_http_server(server, engine):
    import httpx

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            good = {"num": 2, "solver": "dpmpp_2m", "nfe": 6, "seed": 5, "format": "npz"}
            bad = [({"solver": "heun"}, 422), ({"nfe": 0}, 422), ({"num": 10_000}, 422),
                   ({"adapter": "none_such"}, 404), ({"label": 1}, 422)]
            tasks = [client.post("/sample", json=good)] + [client.post("/sample", json=b) for b, _ in bad]
            tasks.append(client.post("/sample", content=b"{not json", headers={"content-type": "application/json"}))
            tasks.append(client.post("/sample", content=b"x" * (128 * 1024)))
            responses = await asyncio.gather(*tasks)
            with np.load(io.BytesIO(responses[0].content), allow_pickle=False) as data:
                np.testing.assert_allclose(data["images"], _library(engine, {k: v for k, v in good.items()
                                                                             if k != "format"}), atol=PARITY_ATOL)
            for response, (_, status) in zip(responses[1:], bad):
                assert response.status_code == status and "error" in response.json()
            assert responses[-2].status_code == 400 and "not valid JSON" in responses[-2].json()["error"]
            assert responses[-1].status_code == 413
            png = await client.post("/sample", json={"num": 3, "nfe": 4})
            assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
            job = await client.post("/finetune", json={"name": "http_job", "dataset": "digits", "steps": 3,
                                                       "batch_size": 4})
            assert job.status_code == 202
            job_id = job.json()["job"]
            for _ in range(600):
                status = (await client.get(f"/jobs/{job_id}")).json()
                if status["state"] in ("done", "failed"):
                    break
                await asyncio.sleep(0.05)
            assert status["state"] == "done" and status["step"] == 3, status
            assert (await client.get("/jobs/nope")).status_code == 404
            taken = await client.post("/finetune", json={"name": "http_job", "dataset": "digits"})
            assert taken.status_code == 409
            adapted = await client.post("/sample", json={"num": 1, "nfe": 4, "adapter": "http_job"})
            assert adapted.status_code == 200
            metrics = (await client.get("/metrics")).text
            for name in ("dpmjax_serve_queue_depth", 'dpmjax_serve_latency_seconds{quantile="0.99"}',
                         "dpmjax_serve_images_per_second", "dpmjax_serve_finetune_steps_per_second",
                         "dpmjax_serve_compilations_total"):
                assert name in metrics

    asyncio.run(scenario())


def test_cli_refuses_a_bad_workdir_before_binding(tmp_path, capsys):
    from dpmjax.main import main

    assert main(["serve", "--workdir", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpmjax: error: --workdir")
