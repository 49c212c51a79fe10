"""Multi-host training, tested on one machine: 2 processes x 4 CPU devices joined by ``jax.distributed`` (gloo
cross-process collectives) train with FSDP-sharded state, checkpoint, resume, and sample a batch sharded across
both processes; the losses, the checkpoint and the samples match 1 process x 8 devices.

The workers are this file run as a script (``python tests/test_multihost.py PROCESS_ID PORT WORKDIR OUT``):
each sets nothing but its environment's ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and calls
``jax.distributed.initialize`` before anything touches a device, as on a pod host.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

NUM_PROCESSES, LOCAL_DEVICES = 2, 4
SAMPLE_SHAPE = (16, 8, 8, 1)


def dit_config(num_steps):
    """The shared one-block DiT with ``fsdp``: its dense kernels are split over devices of both processes."""
    from tiny_configs import tiny_dit_config
    return tiny_dit_config(num_steps=num_steps, checkpoint_every=2, sharding="fsdp")


def x_T():
    return np.random.default_rng(0).standard_normal(SAMPLE_SHAPE).astype(np.float32)


def make_sampler(config, mesh, params):
    import jax

    import dpmjax
    from dpmjax.nn import build_model, make_apply_fn
    from dpmjax.schedules import schedule_from_config
    model, schedule = build_model(config.model), schedule_from_config(config.schedule)
    return dpmjax.make_param_sampler(make_apply_fn(model, schedule), schedule=schedule, solver="dpmpp_2m", nfe=4,
                                     mesh=mesh, params_sharding=jax.tree.map(lambda a: a.sharding, params))


def worker(process_id: int, port: int, workdir: str, out: str) -> None:
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default in jax 0.10; explicit here
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=NUM_PROCESSES,
                               process_id=process_id, initialization_timeout=120, shutdown_timeout_seconds=30)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    from dpmjax.train.loop import train

    # Under the CLI's transfer guard: the loop reads device values only explicitly (metrics at log steps) and
    # orbax's copies of device arrays (this is the path accelerators take: no host copy first) are allowed.
    with jax.transfer_guard_device_to_host("disallow"):
        train(dit_config(2), workdir, quiet=True)           # steps 1-2, checkpoint at 2
        state = train(dit_config(4), workdir, quiet=True)   # resumes from the checkpoint at step 2
    kernel = state.params["params"]["block_0"]["mlp_in"]["kernel"]
    assert not kernel.is_fully_addressable  # fsdp: this process holds only its devices' shards
    with open(os.path.join(out, f"trained_{process_id}.txt"), "w") as f:
        f.write(str(kernel.sharding))

    try:
        from dpmjax.data.pipeline import local_rows
        from dpmjax.sharding import data_sharding, make_mesh
        mesh = make_mesh()
        sharding = data_sharding(mesh)
        rows = local_rows(sharding, SAMPLE_SHAPE[0], SAMPLE_SHAPE[1:])
        noise = jax.make_array_from_process_local_data(sharding, x_T()[rows], SAMPLE_SHAPE)
        samples = make_sampler(dit_config(4), mesh, state.ema_params)(state.ema_params, noise)
        shards = sorted((s.index[0].start or 0, np.asarray(s.data)) for s in samples.addressable_shards)
        np.savez(os.path.join(out, f"samples_{process_id}.npz"), rows=np.array([r for r, _ in shards]),
                 values=np.stack([v for _, v in shards]))
    except Exception:  # noqa: BLE001 - reported to the test, which decides what it means
        import traceback
        with open(os.path.join(out, f"sample_error_{process_id}.txt"), "w") as f:
            f.write(traceback.format_exc())
        # The other process may now wait forever in a collective: leave at once; the test stops it.
        os._exit(3)
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_for(workers, timeout=420, grace=20):
    """Wait for every worker; once one has failed, give the others ``grace`` seconds (a process whose peer died
    waits in a collective until the coordination service times out), then stop them."""
    deadline, failed_at = time.monotonic() + timeout, None
    while any(w.poll() is None for w in workers):
        now = time.monotonic()
        if failed_at is None and any(w.poll() not in (None, 0) for w in workers):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace):
            for w in workers:
                if w.poll() is None:
                    w.kill()  # our own child process, by its handle
            break
        time.sleep(0.5)


def losses_of(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_two_processes_train_resume_and_sample_like_one_process(tmp_path):
    """2 processes x 4 devices train, checkpoint, resume and sample a batch sharded across both processes exactly
    like 1 process x 8 devices."""
    import jax

    from dpmjax.sharding import make_mesh, replicated
    from dpmjax.train.loop import train
    from dpmjax.workdir import load_params

    workdir, out = tmp_path / "multihost", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    start = time.perf_counter()
    logs = [open(out / f"log_{i}.txt", "w") for i in range(NUM_PROCESSES)]  # files: a full pipe would block
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(port), str(workdir),
                                 str(out)], env=env, stdout=log, stderr=subprocess.STDOUT)
               for i, log in enumerate(logs)]
    try:
        reference = train(dit_config(4), str(tmp_path / "reference"), quiet=True)  # 1 process x 8 devices
        wait_for(workers)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        for log in logs:
            log.close()
    elapsed = time.perf_counter() - start
    logs = [(out / f"log_{i}.txt").read_text() for i in range(NUM_PROCESSES)]
    for i, (w, log) in enumerate(zip(workers, logs)):
        assert (out / f"trained_{i}.txt").exists(), f"worker {i} exited with {w.returncode}:\n{log[-4000:]}"
    assert "resuming from step 2" in logs[0], logs[0][-2000:]

    # Training: the same losses as one process (gloo's cross-process sums round differently: float tolerance).
    multi, single = losses_of(workdir), losses_of(tmp_path / "reference")
    assert len(multi) == 4
    np.testing.assert_allclose(multi, single, rtol=1e-5)
    # One checkpoint written by both processes together, readable (verified) by one process.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    _, ema, _, _ = load_params(str(workdir))
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(reference.ema_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    # Sampling a batch sharded across both processes.
    errors = [(out / f"sample_error_{i}.txt") for i in range(NUM_PROCESSES)]
    errors = [p.read_text() for p in errors if p.exists()]
    assert not errors, f"sampling across processes failed:\n{errors[0][-4000:]}"
    for i, (w, log) in enumerate(zip(workers, logs)):
        assert w.returncode == 0, f"worker {i} exited with {w.returncode}:\n{log[-4000:]}"
    mesh = make_mesh()
    params = jax.device_put(ema, replicated(mesh))
    expected = np.asarray(make_sampler(dit_config(4), mesh, params)(params, x_T()))
    got = np.zeros(SAMPLE_SHAPE, np.float32)
    seen = 0
    for i in range(NUM_PROCESSES):
        with np.load(out / f"samples_{i}.npz") as parts:
            for row, values in zip(parts["rows"], parts["values"]):
                got[row:row + len(values)] = values
                seen += len(values)
    assert seen == SAMPLE_SHAPE[0]  # each process returned its own rows, together the whole batch
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    print(f"2 x {LOCAL_DEVICES}-device processes + the 1 x 8 reference: {elapsed:.0f} s")


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
