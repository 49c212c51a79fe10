"""Training throughput of the shipped configs on this CPU, against an equal-size PyTorch anchor.

    python experiments/train_throughput.py            # everything (< 8 min on 2 busy cores)
    python experiments/train_throughput.py --parts conv,flags

Parts (CSV under results/train_throughput/):
  train  images/s of dpmjax's own jitted train step (build_model / init_params / make_optimizer /
         make_train_step on make_mesh(1), random data of the config's shape) for configs/digits.py,
         configs/fashion_mnist.py and configs/fashion_mnist_dit.py, interleaved round by round with a torch
         mirror of the same architecture (same widths, blocks, attention, AdamW + grad clip + EMA, same batch).
  conv   one 3x3 convolution of the Fashion-MNIST UNet: forward, input gradient and weight gradient, JAX in
         NHWC/HWIO (flax's layout) and NCHW/OIHW against torch (NCHW and channels_last).
  flags  the conv part again in subprocesses under XLA CPU flags accepted by jax 0.10.2 (oneDNN, XNNPACK
         variants, single-threaded Eigen), plus the Fashion UNet train step under the default and each flag.

Timings are medians of per-step wall times after warm-up (block_until_ready), with os.getloadavg() recorded
for every row: other jobs share the cores, so read the ratios (measured back to back) rather than the
absolute numbers.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "train_throughput")
CONFIGS = ("digits", "fashion_mnist", "fashion_mnist_dit")
FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "eigen_single_thread": "--xla_cpu_multi_thread_eigen=false",
}


def load():
    return "%.2f/%.2f/%.2f" % os.getloadavg()


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def get_config(name):
    from dpmjax.config import load_config

    return load_config(f"{name}.py")


def write_csv(name, rows):
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, name)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}", flush=True)


# ----------------------------------------------------------------------------------------------- torch mirrors

def torch_modules():
    import torch
    from torch import nn
    import torch.nn.functional as F

    from dpmjax.nn.layers import num_groups_for, sincos_pos_embed_2d

    def gn(c, g):
        return nn.GroupNorm(num_groups_for(c, g), c, eps=1e-5)

    def sinusoid(t, dim):
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    class TimeEmbed(nn.Module):
        def __init__(self, freq, feat):
            super().__init__()
            self.freq, self.l0, self.l1 = freq, nn.Linear(freq, feat), nn.Linear(feat, feat)

        def forward(self, t):
            return self.l1(F.silu(self.l0(sinusoid(t, self.freq))))

    class ResBlock(nn.Module):
        def __init__(self, cin, cout, emb, g):
            super().__init__()
            self.n0, self.c0 = gn(cin, g), nn.Conv2d(cin, cout, 3, padding=1)
            self.emb, self.n1, self.c1 = nn.Linear(emb, 2 * cout), gn(cout, g), nn.Conv2d(cout, cout, 3, padding=1)
            self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

        def forward(self, x, e):
            h = self.c0(F.silu(self.n0(x)))
            s, b = self.emb(F.silu(e))[:, :, None, None].chunk(2, dim=1)
            return self.skip(x) + self.c1(F.silu(self.n1(h) * (1 + s) + b))

    class Attn(nn.Module):
        def __init__(self, c, heads, g):
            super().__init__()
            self.heads, self.n, self.qkv, self.proj = heads, gn(c, g), nn.Linear(c, 3 * c), nn.Linear(c, c)

        def forward(self, x):
            b, c, hh, ww = x.shape
            tok = self.n(x).flatten(2).transpose(1, 2)
            q, k, v = self.qkv(tok).view(b, hh * ww, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, hh * ww, c)
            return x + self.proj(o).transpose(1, 2).reshape(b, c, hh, ww)

    class UNet(nn.Module):
        """Mirror of dpmjax.nn.UNet (ADM, scale-shift norm, skip concat, nearest upsample + conv) in NCHW."""

        def __init__(self, m, in_ch, size):
            super().__init__()
            C, g, nrb = m.model_channels, m.num_groups, m.num_res_blocks
            sides = [size]
            for _ in m.channel_mult[1:]:
                sides.append((sides[-1] + 1) // 2)
            attn = lambda c, lvl: Attn(c, m.num_heads, g) if sides[lvl] in self.res else nn.Identity()  # noqa
            E = 4 * C
            self.res = set(m.attention_resolutions)
            self.time = TimeEmbed(C, E)
            self.label = nn.Embedding(m.num_classes + 1, E) if m.get("num_classes") else None
            self.conv_in = nn.Conv2d(in_ch, C, 3, padding=1)
            self.down, chans, ch = nn.ModuleList(), [C], C
            self.mults = tuple(m.channel_mult)
            for lvl, mult in enumerate(self.mults):
                for _ in range(nrb):
                    self.down.append(nn.ModuleList([ResBlock(ch, C * mult, E, g), attn(C * mult, lvl)]))
                    ch = C * mult
                    chans.append(ch)
                if lvl != len(self.mults) - 1:
                    self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                    chans.append(ch)
            self.mid = nn.ModuleList([ResBlock(ch, ch, E, g), Attn(ch, m.num_heads, g), ResBlock(ch, ch, E, g)])
            self.up = nn.ModuleList()
            for lvl in range(len(self.mults) - 1, -1, -1):
                for _ in range(nrb + 1):
                    cout = C * self.mults[lvl]
                    self.up.append(nn.ModuleList([ResBlock(ch + chans.pop(), cout, E, g), attn(cout, lvl)]))
                    ch = cout
                if lvl != 0:
                    self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
            self.norm_out, self.conv_out = gn(ch, g), nn.Conv2d(ch, in_ch, 3, padding=1)
            self.nrb = nrb

        def forward(self, x, t, y):
            e = self.time(t)
            if self.label is not None:
                e = e + self.label(y)
            h = self.conv_in(x)
            skips = [h]
            for mod in self.down:
                if isinstance(mod, nn.Conv2d):
                    h = mod(h)
                else:
                    h = mod[1](mod[0](h, e))
                skips.append(h)
            h = self.mid[2](self.mid[1](self.mid[0](h, e)), e)
            for mod in self.up:
                if isinstance(mod, nn.Conv2d):
                    h = mod(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
                else:
                    h = mod[1](mod[0](torch.cat([h, skips.pop()], dim=1), e))
            return self.conv_out(F.silu(self.norm_out(h)))

    class DiTBlock(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads, self.ada = heads, nn.Linear(d, 6 * d)
            self.n0, self.n1 = nn.LayerNorm(d, 1e-6, elementwise_affine=False), nn.LayerNorm(d, 1e-6,
                                                                                            elementwise_affine=False)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp_in, self.mlp_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x, c):
            b, n, d = x.shape
            sa, ca, ga, sm, cm, gm = self.ada(F.silu(c))[:, None].chunk(6, dim=-1)
            h = self.n0(x) * (1 + ca) + sa
            q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
            x = x + ga * self.proj(h)
            h = self.n1(x) * (1 + cm) + sm
            return x + gm * self.mlp_out(F.gelu(self.mlp_in(h), approximate="tanh"))

    class DiT(nn.Module):
        def __init__(self, m, in_ch, size):
            super().__init__()
            p, d = m.patch_size, m.hidden_size
            self.p, self.g = p, size // p
            self.patch = nn.Conv2d(in_ch, d, p, stride=p)
            self.register_buffer("pos", torch.from_numpy(sincos_pos_embed_2d(d, self.g, self.g))[None])
            self.time = TimeEmbed(m.freq_dim, d)
            self.label = nn.Embedding(m.num_classes + 1, d)
            self.blocks = nn.ModuleList([DiTBlock(d, m.num_heads) for _ in range(m.depth)])
            self.final_ada, self.final_norm = nn.Linear(d, 2 * d), nn.LayerNorm(d, 1e-6, elementwise_affine=False)
            self.final = nn.Linear(d, p * p * in_ch)

        def forward(self, x, t, y):
            b, ch = x.shape[:2]
            tok = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            c = self.time(t) + self.label(y)
            for blk in self.blocks:
                tok = blk(tok, c)
            s, sc = self.final_ada(F.silu(c))[:, None].chunk(2, dim=-1)
            out = self.final(self.final_norm(tok) * (1 + sc) + s)
            out = out.view(b, self.g, self.g, self.p, self.p, ch).permute(0, 5, 1, 3, 2, 4)
            return out.reshape(b, ch, self.g * self.p, self.g * self.p)

    return UNet, DiT


def torch_step_fn(config, image_shape):
    """A torch train step equivalent to dpmjax.train.step: eps loss at DDPM times, clip, AdamW, EMA."""
    import torch

    UNet, DiT = torch_modules()
    h, w, c = image_shape
    m = config.model
    model = UNet(m, c, h) if m.kind == "unet" else DiT(m, c, h)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay)
    N = config.schedule.num_train_timesteps
    betas = torch.linspace(1e-4, 0.02, N)  # "linear" DDPM betas
    abar = torch.cumprod(1 - betas, 0)
    B = config.data.batch_size
    x0 = torch.rand(B, c, h, w) * 2 - 1
    y = torch.randint(0, 10, (B,))
    conditional = bool(m.get("num_classes"))

    def step():
        n = torch.randint(0, N, (B,))
        a = abar[n].sqrt()[:, None, None, None]
        s = (1 - abar[n]).sqrt()[:, None, None, None]
        noise = torch.randn_like(x0)
        yy = torch.where(torch.rand(B) < 0.1, torch.full_like(y, 10), y) if conditional else y
        out = model(a * x0 + s * noise, n.float(), yy if conditional else None)
        loss = ((out - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(model.parameters()), 1 - config.train.ema_decay)
        return loss

    return step, sum(p.numel() for p in model.parameters())


def jax_step_fn(config):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dpmjax.nn import build_model, init_params, network_time
    from dpmjax.schedules import schedule_from_config
    from dpmjax.sharding import make_mesh, replicated
    from dpmjax.train import optim
    from dpmjax.train.state import create_train_state
    from dpmjax.train.step import make_train_step

    shape = tuple(config.data.image_shape)
    mesh = make_mesh(1)
    schedule = schedule_from_config(config.schedule)
    model = build_model(config.model)
    params = init_params(model, shape, config.seed)
    nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tx = optim.make_optimizer(total_steps=config.train.num_steps, **dict(config.optim))
    state = jax.device_put(create_train_state(params, tx, config.seed), replicated(mesh))
    conditional = config.model.get("num_classes") is not None

    def train_apply_fn(params, x_t, t, y, key):
        """make_train_step's model contract, as the trainer builds it: train mode, dropout and label-dropout
        rngs from ``key``, labels only for class-conditional models."""
        return model.apply(params, x_t, network_time(schedule, t), y=y if conditional else None, train=True,
                           rngs={"dropout": key})

    step = make_train_step(train_apply_fn, tx, schedule, mesh, target=config.train.target, min_snr_gamma=None,
                           ema_decay=config.train.ema_decay)
    B = config.data.batch_size
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (B,) + shape), jnp.float32)}
    if config.model.get("num_classes"):
        batch["label"] = jnp.asarray(rng.integers(0, 10, (B,)), jnp.int32)
    holder = {"state": state, "metrics": None}

    def run():  # the metrics accumulator is carried on device, as the training loop does
        holder["state"], holder["metrics"] = step(holder["state"], batch, holder["metrics"])
        jax.block_until_ready(holder["metrics"])

    return run, nparams


def part_train(configs, rounds, per_round, flag_tag="default"):
    import torch

    torch.set_num_threads(2)
    rows = []
    for name in configs:
        config = get_config(name)
        shape = tuple(config.data.image_shape)
        B = config.data.batch_size
        t0 = time.perf_counter()
        jrun, jn = jax_step_fn(config)
        jrun()
        jrun()  # compile + one warm step
        jax_compile = time.perf_counter() - t0
        trun2, tn = torch_step_fn(config, shape)

        def trun1():  # the same torch step on one intra-op thread
            torch.set_num_threads(1)
            try:
                trun2()
            finally:
                torch.set_num_threads(2)

        for fn in (trun2, trun2, trun1):
            fn()
        times = {"jax": [], "torch": [], "torch1": []}
        loads = []
        for _ in range(rounds):  # interleaved: JAX, torch (2 threads), torch (1 thread), round after round
            for fw, fn in (("jax", jrun), ("torch", trun2), ("torch1", trun1)):
                for _ in range(per_round):
                    t = time.perf_counter()
                    fn()
                    times[fw].append(time.perf_counter() - t)
            loads.append(os.getloadavg()[0])
        jm, tm, t1 = median(times["jax"]), median(times["torch"]), median(times["torch1"])
        row = dict(config=name, model=config.model.kind, batch=B, flags=flag_tag, jax_params=jn, torch_params=tn,
                   param_ratio=round(tn / jn, 3), jax_s_per_step=round(jm, 5), torch_s_per_step=round(tm, 5),
                   torch1_s_per_step=round(t1, 5), jax_img_s=round(B / jm, 1), torch_img_s=round(B / tm, 1),
                   torch1_img_s=round(B / t1, 1), jax_over_torch_speed=round(tm / jm, 2),
                   jax_over_torch1_speed=round(t1 / jm, 2), jax_min_s=round(min(times["jax"]), 5),
                   torch_min_s=round(min(times["torch"]), 5), torch1_min_s=round(min(times["torch1"]), 5),
                   steps_each=len(times["jax"]), jax_compile_s=round(jax_compile, 1),
                   load_min=round(min(loads), 2), load_max=round(max(loads), 2))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ conv op parts

CONV_CASES = (  # (batch, side, c_in, c_out): Fashion UNet level 0 and level 1 ResBlock convs at batch 64
    (64, 28, 16, 16),
    (64, 14, 32, 32),
)


def timeit(fn, reps):
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return median(ts)


def part_conv(rounds=6, per_round=5, flag_tag="default", with_torch=True):
    """Per-op timings, all implementations interleaved round by round; median and min over all calls."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rows = []
    rng = np.random.default_rng(0)
    for (B, S, ci, co) in CONV_CASES:
        flops = 2 * B * S * S * ci * co * 9
        x = rng.standard_normal((B, S, S, ci)).astype(np.float32)
        w = rng.standard_normal((3, 3, ci, co)).astype(np.float32) * 0.1
        gy = rng.standard_normal((B, S, S, co)).astype(np.float32)
        fns = {}
        for layout, dn, xx, ww, gg in (
                ("NHWC", ("NHWC", "HWIO", "NHWC"), x, w, gy),
                ("NCHW", ("NCHW", "OIHW", "NCHW"), x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1),
                 gy.transpose(0, 3, 1, 2))):
            conv = lambda a, k, dn=dn: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=dn)  # noqa
            xj, wj, gj = jnp.asarray(xx), jnp.asarray(ww), jnp.asarray(gg)
            fwd = jax.jit(conv)
            dx = jax.jit(lambda a, k, g, conv=conv: jax.vjp(lambda a_: conv(a_, k), a)[1](g)[0])
            dw = jax.jit(lambda a, k, g, conv=conv: jax.vjp(lambda k_: conv(a, k_), k)[1](g)[0])
            fns[f"jax_{layout}"] = (lambda f=fwd, a=xj, k=wj: f(a, k).block_until_ready(),
                                    lambda f=dx, a=xj, k=wj, g=gj: f(a, k, g).block_until_ready(),
                                    lambda f=dw, a=xj, k=wj, g=gj: f(a, k, g).block_until_ready())
        if with_torch:
            import torch
            import torch.nn.functional as F

            torch.set_num_threads(2)
            for layout in ("NCHW", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
                wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=fmt)
                gt = torch.from_numpy(gy.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)

                def bwd(mask, xt=xt, wt=wt, gt=gt):
                    with torch.no_grad():
                        return torch.ops.aten.convolution_backward(gt, xt, wt, None, [1, 1], [1, 1], [1, 1], False,
                                                                   [0, 0], 1, mask)

                def fwd_t(xt=xt, wt=wt):
                    with torch.no_grad():
                        return F.conv2d(xt, wt, padding=1)

                fns[f"torch_{layout}"] = (fwd_t, lambda: bwd([True, False, False]), lambda: bwd([False, True, False]))
        times = {(impl, op): [] for impl in fns for op in range(3)}
        for impl in fns:  # compile / warm up
            for op in range(3):
                fns[impl][op]()
                fns[impl][op]()
        loads = []
        for _ in range(rounds):
            for impl in fns:
                for op in range(3):
                    for _ in range(per_round):
                        t = time.perf_counter()
                        fns[impl][op]()
                        times[(impl, op)].append(time.perf_counter() - t)
            loads.append(os.getloadavg()[0])
        for impl in fns:
            med = [median(times[(impl, op)]) for op in range(3)]
            mn = [min(times[(impl, op)]) for op in range(3)]
            row = dict(flags=flag_tag, impl=impl, batch=B, side=S, c_in=ci, c_out=co,
                       fwd_ms=round(1e3 * med[0], 3), dinput_ms=round(1e3 * med[1], 3),
                       dweight_ms=round(1e3 * med[2], 3), fwd_min_ms=round(1e3 * mn[0], 3),
                       dinput_min_ms=round(1e3 * mn[1], 3), dweight_min_ms=round(1e3 * mn[2], 3),
                       fwd_gflops_min=round(flops / mn[0] / 1e9, 1), dweight_gflops_min=round(flops / mn[2] / 1e9, 1),
                       load_min=round(min(loads), 2), load_max=round(max(loads), 2))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def part_flags(timeout, step_flags=(), step_config="digits"):
    """Each flag set in a fresh process (XLA_FLAGS is read once at backend start); the flag sets named in
    ``step_flags`` also time ``step_config``'s JAX train step (a fresh compile each, ~1 min on busy cores)."""
    rows_conv, rows_step = [], []
    for tag, flags in FLAG_SETS.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", tag,
               "--child-step", step_config if tag in step_flags else ""]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            print(f"flags {tag}: timed out after {timeout}s", flush=True)
            continue
        if out.returncode:
            print(f"flags {tag}: failed: {out.stderr[-400:]}", flush=True)
            continue
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                (rows_step if "config" in row else rows_conv).append(row)
                print(line, flush=True)
    return rows_conv, rows_step


def child(tag, step_config):
    """Runs inside a flag subprocess: conv ops (JAX only) and, with --step-flags, one config's JAX train step."""
    part_conv(rounds=4, flag_tag=tag, with_torch=False)
    if not step_config:
        return
    import jax

    config = get_config(step_config)
    t0 = time.perf_counter()
    run, n = jax_step_fn(config)
    run()
    compile_s = time.perf_counter() - t0
    s = timeit(run, 8)
    B = config.data.batch_size
    print(json.dumps(dict(config=step_config, flags=tag, jax_s_per_step=round(s, 5), jax_img_s=round(B / s, 1),
                          compile_s=round(compile_s, 1), load=load(), jax=jax.__version__)), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="train,conv,flags")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=2)
    ap.add_argument("--flag-timeout", type=int, default=90)
    ap.add_argument("--step-flags", default="", help="flag sets (names in FLAG_SETS) that also time a train step")
    ap.add_argument("--step-config", default="digits")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-step", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.child_step)
        return
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    print(f"start load {load()}", flush=True)
    if "train" in parts:
        write_csv("train_steps.csv", part_train(args.configs.split(","), args.rounds, args.per_round))
    if "conv" in parts:
        write_csv("conv_ops.csv", part_conv())
    if "flags" in parts:
        rc, rs = part_flags(args.flag_timeout, [f for f in args.step_flags.split(",") if f], args.step_config)
        if rc:
            write_csv("flags_conv.csv", rc)
        if rs:
            write_csv("flags_step.csv", rs)
    print(f"total {time.perf_counter() - t0:.0f} s, end load {load()}", flush=True)


if __name__ == "__main__":
    main()
