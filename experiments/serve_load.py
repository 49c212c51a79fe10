"""Load test of ``dpmjax serve``: co-serving sampling and LoRA finetuning against two baselines (issue 19).

    python experiments/serve_load.py                                   # rates 4,8,16 req/s, 20 s windows
    python experiments/serve_load.py --rates 2,4 --window 10 --out /tmp/serve_load

A real HTTP client (httpx, async) sends a Poisson stream of ``POST /sample`` requests (``--num`` images each,
DPM-Solver++(2M), ``--nfe``) for ``--window`` seconds per rate to a real server started as a subprocess on a free
local port. Modes (one server each, rates run one after another on it):

  sequential      ``dpmjax serve --mode sequential``: one request at a time through the library sampler, no
                  batching (baseline a: sampling alone, unbatched).
  batch           ``--mode batch``: continuous batching of sampling only (sampling alone, batched).
  batch+trainer   ``--mode batch`` plus a separate ``dpmjax finetune --method lora`` process on the same teacher
                  (baseline b: the two sharing the machine as separate processes).
  coserve         the default mode with one long LoRA job (``POST /finetune``) co-served in the sampling batches.

The finetuning modes also run rate 0 (no sampling load): their peak finetuning throughput. Both trainers run
rank-4 LoRA, batch 8, Adam 2e-3 on the same teacher; the separate trainer logs every step
(``--config.train.log_every=1``), and its step rate is read from its metrics.jsonl by the client's clock; the
co-served job's from ``GET /jobs/ID``. Latency is measured by the client (send to last byte); a request counts as
on time when it is within ``--latency-target-ms`` (also the server's target). The teacher is the tiny
``configs/digits.py:runlocal`` UNet (trained in seconds; sample quality is not the point).

Writes OUT/serve_load.csv (one row per mode and rate) and OUT/serve_load.png (p99 latency and finetuning steps/s
against the request rate).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "serve_load")
MODES = ("sequential", "batch", "batch+trainer", "coserve")
FIELDS = ["mode", "rate", "requests", "ok", "on_time", "p50_ms", "p99_ms", "images_per_s", "finetune_steps_per_s"]


def _dpmjax(*args):
    return [sys.executable, "-m", "dpmjax.main", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_teacher(out: str) -> str:
    workdir = os.path.join(out, "teacher")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        subprocess.run(_dpmjax("train", "--config", os.path.join(ROOT, "configs", "digits.py:runlocal"),
                               "--workdir", workdir), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return workdir


def start_server(workdir, mode, args, state_dir, log):
    port = _free_port()
    proc = subprocess.Popen(_dpmjax("serve", "--workdir", workdir, "--port", str(port), "--mode", mode,
                                    "--batch-rows", str(args.rows), "--latency-target-ms", str(args.latency_target_ms),
                                    "--max-nfe", str(max(args.nfe, 10)), "--state-dir", state_dir),
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def start_trainer(workdir, out, log):
    trainer_dir = os.path.join(out, "trainer")
    shutil.rmtree(trainer_dir, ignore_errors=True)
    proc = subprocess.Popen(_dpmjax("finetune", "--method", "lora", "--teacher", workdir, "--workdir", trainer_dir,
                                    "--config", os.path.join(ROOT, "configs", "methods", "lora.py"),
                                    "--config.train.num_steps=1000000", "--config.train.log_every=1",
                                    "--config.train.checkpoint_every=1000000"),
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, os.path.join(trainer_dir, "metrics.jsonl")


def trainer_step(path) -> int:
    """The last step the separate trainer logged (0 before its first)."""
    if not os.path.isfile(path):
        return 0
    step = 0
    with open(path) as f:
        for line in f:
            try:
                step = max(step, int(json.loads(line)["step"]))
            except (ValueError, KeyError):
                continue
    return step


async def wait_ready(client, url, proc, timeout=600.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if (await client.get(url + "/health")).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError("the server did not start")


async def poisson_window(client, url, rate, args, rng):
    """Send Poisson arrivals at ``rate`` for ``args.window`` s; (latencies s of successes, failures, images, span)."""
    body = {"num": args.num, "solver": "dpmpp_2m", "nfe": args.nfe, "format": "npz"}
    results = []

    async def one(seed):
        start = time.perf_counter()
        try:
            response = await client.post(url + "/sample", json={**body, "seed": seed}, timeout=args.request_timeout)
            ok = response.status_code == 200
        except Exception:  # noqa: BLE001 - a timeout or a dropped connection is a failed request
            ok = False
        results.append((ok, time.perf_counter() - start, time.perf_counter()))

    tasks, t0 = [], time.perf_counter()
    arrival = rng.exponential(1.0 / rate)
    seed = 0
    while arrival < args.window:
        await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
        tasks.append(asyncio.create_task(one(seed)))
        seed += 1
        arrival += rng.exponential(1.0 / rate)
    await asyncio.gather(*tasks)
    latencies = [lat for ok, lat, _ in results if ok]
    span = max((end for _, _, end in results), default=t0 + args.window) - t0
    return latencies, len(results) - len(latencies), len(latencies) * args.num, max(span, args.window)


async def run_mode(mode, workdir, args, out, rng):
    import httpx

    log = open(os.path.join(out, f"log_{mode.replace('+', '_')}.txt"), "w")
    state_dir = os.path.join(out, f"state_{mode.replace('+', '_')}")
    shutil.rmtree(state_dir, ignore_errors=True)
    server, url = start_server(workdir, "batch" if mode == "batch+trainer" else mode, args, state_dir, log)
    trainer = None
    rows = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    try:
        async with httpx.AsyncClient(limits=limits, timeout=args.request_timeout) as client:
            await wait_ready(client, url, server)
            progress = None
            if mode == "coserve":
                response = await client.post(url + "/finetune", json={"name": "load", "dataset": "digits",
                                                                      "steps": 100_000, "batch_size": 8, "rank": 4,
                                                                      "lr": 2e-3})
                if response.status_code != 202:
                    raise RuntimeError(f"POST /finetune: {response.status_code} {response.text}")
                job = response.json()["job"]

                async def job_step():
                    return (await client.get(f"{url}/jobs/{job}")).json()["step"]
                progress = job_step
            elif mode == "batch+trainer":
                trainer, metrics_path = start_trainer(workdir, out, log)

                async def separate_trainer_step():
                    if trainer.poll() is not None:
                        raise RuntimeError(f"the trainer exited with status {trainer.returncode}")
                    return trainer_step(metrics_path)
                progress = separate_trainer_step
            if progress is not None:  # wait until the finetuning runs (compiled) before measuring
                deadline = time.time() + 600
                while await progress() < 2:
                    if time.time() > deadline:
                        raise TimeoutError("finetuning did not start")
                    await asyncio.sleep(0.5)
            # one warm-up request (sequential mode compiles its sampler here)
            await client.post(url + "/sample", json={"num": args.num, "solver": "dpmpp_2m", "nfe": args.nfe})
            rates = ([0.0] if progress is not None else []) + args.rates
            for rate in rates:
                step0, t0 = (await progress() if progress else 0), time.perf_counter()
                if rate > 0:
                    latencies, failed, images, span = await poisson_window(client, url, rate, args, rng)
                else:
                    await asyncio.sleep(args.window)
                    latencies, failed, images, span = [], 0, 0, args.window
                steps = (await progress() - step0) if progress else 0
                elapsed = time.perf_counter() - t0
                lat_ms = np.asarray(latencies) * 1000.0
                row = dict(mode=mode, rate=rate, requests=len(latencies) + failed, ok=len(latencies),
                           on_time=int(np.sum(lat_ms <= args.latency_target_ms)),
                           p50_ms=float(np.percentile(lat_ms, 50)) if len(lat_ms) else float("nan"),
                           p99_ms=float(np.percentile(lat_ms, 99)) if len(lat_ms) else float("nan"),
                           images_per_s=images / span if rate > 0 else 0.0,
                           finetune_steps_per_s=steps / elapsed if progress else float("nan"))
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        for proc in (trainer, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        log.close()
    return rows


def plot(rows, path, target_ms):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_ft) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode and r["rate"] > 0]
        if mine:
            ax_lat.plot([r["rate"] for r in mine], [r["p99_ms"] for r in mine], "o-", label=mode)
        tuned = [r for r in rows if r["mode"] == mode and not np.isnan(r["finetune_steps_per_s"])]
        if tuned:
            ax_ft.plot([r["rate"] for r in tuned], [r["finetune_steps_per_s"] for r in tuned], "o-", label=mode)
    ax_lat.axhline(target_ms, color="gray", ls="--", label="latency target")
    ax_lat.set(xlabel="requests / s (Poisson)", ylabel="p99 latency (ms)", yscale="log", title="sampling latency")
    ax_ft.set(xlabel="requests / s (Poisson)", ylabel="LoRA steps / s", title="finetuning throughput")
    ax_lat.legend()
    ax_ft.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="4,8,16", help="request rates (req/s), comma-separated")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of arrivals per rate")
    parser.add_argument("--num", type=int, default=4, help="images per request")
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--rows", type=int, default=16, help="the server's --batch-rows")
    parser.add_argument("--latency-target-ms", type=float, default=1000.0)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {MODES}")
    os.makedirs(args.out, exist_ok=True)
    workdir = train_teacher(args.out)
    rng = np.random.default_rng(args.seed)
    rows = []
    start = time.time()
    for mode in modes:
        rows += asyncio.run(run_mode(mode, workdir, args, args.out, rng))
        with open(os.path.join(args.out, "serve_load.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    plot(rows, os.path.join(args.out, "serve_load.png"), args.latency_target_ms)
    print(f"wrote {args.out}/serve_load.csv and serve_load.png in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
