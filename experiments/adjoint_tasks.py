"""AdjointDPM's three tasks at CPU scale, on the 8x8 digits (Pan et al., ICLR 2024, Sec. 5):

    python experiments/adjoint_tasks.py               # train (or load cached) models, then tasks a, b, c
    python experiments/adjoint_tasks.py --task a      # one task; --quick: fewer samples and iterations

  (a) security audit: optimise the initial noise x_T so that a digits classifier mislabels the generated image
      while the image stays close to the original sample -> attack success rate and image distances.
  (b) conditioning inversion: learn a new conditioning embedding from a differentiable metric alone (stroke
      thickness = mean ink), then generate from fresh noise with it.
  (c) stylisation finetuning: finetune the model params so that samples minimise a Gram-matrix style loss
      (horizontal-stripe texture), with an L2 anchor to the original params to keep diversity -> style loss and
      Frechet domain distances before/after.

Models (no trained workdir is needed): a class-conditional residual-MLP eps-model (LinearVP, continuous time)
trained here on ``get_dataset("digits")`` in a few CPU minutes, whose conditioning is a continuous 16-d
embedding looked up from a learned table (so task b can learn a new one); the classifier is the project's
domain metric ``dpmjax.metrics.domain.domain_metric("digits")`` (a small CNN, also the Frechet feature space).
Both are cached under ``$DPMJAX_CACHE`` (default ~/.cache/dpmjax). Every gradient goes through
``dpmjax.adjoint.value_and_grad_through_sampling`` with method="backsolve" (the paper's continuous adjoint) on
the rho-ODE, Heun on a 10-step logSNR grid (20 NFE forward). Writes results/adjoint/task_*.png, *.csv, tasks.json.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import serialization


import dpmjax  # noqa: E402
from dpmjax.adjoint import generate, value_and_grad_through_sampling  # noqa: E402
from dpmjax.data import get_dataset  # noqa: E402
from dpmjax.metrics.domain import cache_dir, domain_metric  # noqa: E402
from dpmjax.metrics.fid import frechet_distance, statistics_from_features  # noqa: E402

OUT = os.path.join("results", "adjoint")
SCHEDULE = dpmjax.LinearVP()
EMBED_DIM, NULL_CLASS = 16, 10
SAMPLER = dict(schedule=SCHEDULE, method="backsolve", solver="heun", num_steps=10, spacing="logSNR")
TRAIN = dict(steps=6000, batch=256, lr=2e-3, width=256, blocks=3, ema=0.999, label_dropout=0.1, seed=0)


# -- the class-conditional eps-model ---------------------------------------------------------------------------

class CondMLP(nn.Module):
    """eps(x [B, 8, 8, 1], t [B], e [B, EMBED_DIM]): a residual MLP on [x, time features, embedding]."""

    width: int = 256
    blocks: int = 3

    @nn.compact
    def __call__(self, x, t, e):
        freqs = jnp.exp(jnp.linspace(0.0, np.log(1000.0), 16)).astype(x.dtype)
        temb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
        h = nn.Dense(self.width)(jnp.concatenate([x.reshape(x.shape[0], -1), temb, e], -1))
        for _ in range(self.blocks):
            h = h + nn.Dense(self.width)(nn.silu(nn.LayerNorm()(h)))
        return nn.Dense(int(np.prod(x.shape[1:])))(nn.silu(h)).reshape(x.shape)


NET = CondMLP(TRAIN["width"], TRAIN["blocks"])


def eps_model(params, x, t, embedding):
    """apply_fn(params, x, t, **cond) for dpmjax.adjoint: cond = {"embedding": [B, EMBED_DIM]}."""
    return NET.apply(params, x, t, embedding)


def _digits(split):
    source = get_dataset("digits", split)
    batch = source.get_batch(np.arange(len(source)))
    return np.asarray(batch["image"], np.float32), np.asarray(batch["label"], np.int32)


def train_eps_model(images, labels):
    """eps-MSE on LinearVP with t ~ U(1e-3, 1), label dropout to the null class, EMA params."""
    key = jax.random.key(TRAIN["seed"])
    params = {"net": NET.init(key, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)), jnp.zeros((1, EMBED_DIM))),
              "embed": 0.5 * jax.random.normal(jax.random.fold_in(key, 1), (NULL_CLASS + 1, EMBED_DIM))}
    tx = optax.adamw(optax.cosine_decay_schedule(TRAIN["lr"], TRAIN["steps"]), weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, ema, opt_state, x0, y, key):
        k_t, k_n, k_d = jax.random.split(key, 3)
        t = jax.random.uniform(k_t, (x0.shape[0],), minval=1e-3, maxval=1.0)
        noise = jax.random.normal(k_n, x0.shape)
        y = jnp.where(jax.random.uniform(k_d, y.shape) < TRAIN["label_dropout"], NULL_CLASS, y)
        a, s = SCHEDULE.alpha(t)[:, None, None, None], SCHEDULE.sigma(t)[:, None, None, None]

        def loss_fn(p):
            return jnp.mean((eps_model(p["net"], a * x0 + s * noise, t, p["embed"][y]) - noise) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: TRAIN["ema"] * e + (1 - TRAIN["ema"]) * p, ema, params)
        return params, ema, opt_state, loss

    rng = np.random.default_rng(TRAIN["seed"])
    ema, losses = params, []
    for i in range(TRAIN["steps"]):
        idx = rng.integers(0, len(images), TRAIN["batch"])
        params, ema, opt_state, loss = step(params, ema, opt_state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]),
                                            jax.random.fold_in(key, i + 2))
        losses.append(float(loss) if i % 100 == 0 else None)
        if i % 1000 == 0:
            print(f"  train step {i}: loss {float(loss):.4f}", flush=True)
    return ema


def load_or_train_eps_model(images, labels):
    tag = hashlib.sha256(json.dumps(TRAIN, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), "adjoint_tasks", f"digits-cond-mlp-{tag}.msgpack")
    template = {"net": NET.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)), jnp.zeros((1, EMBED_DIM))),
                "embed": jnp.zeros((NULL_CLASS + 1, EMBED_DIM))}
    if os.path.exists(path):
        with open(path, "rb") as f:
            return jax.tree.map(jnp.asarray, serialization.from_bytes(template, f.read())), path, None
    start = time.perf_counter()
    params = train_eps_model(images, labels)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
        f.write(serialization.to_bytes(params))
    os.replace(f.name, path)
    return params, path, time.perf_counter() - start


# -- helpers ----------------------------------------------------------------------------------------------------

def sample(net_params, x_T, cond):
    x_0, _ = generate(eps_model, net_params, x_T, {"embedding": cond}, **SAMPLER)
    return x_0


def ink(x):
    """Stroke thickness proxy: mean ink (x in [-1, 1] -> (x + 1)/2), per image."""
    return jnp.mean((x + 1.0) / 2.0, axis=(1, 2, 3))


def save_grid(path, rows, titles=None, row_labels=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [np.clip(np.asarray(r), -1, 1) for r in rows]
    n_rows, n_cols = len(rows), rows[0].shape[0]
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.9 * n_cols, 1.0 * n_rows + 0.3), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.imshow(row[j, ..., 0], cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if titles is not None and titles[i] is not None:
                ax.set_title(str(titles[i][j]), fontsize=7)
        if row_labels:
            axes[i][0].set_ylabel(row_labels[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_curves(path, curves: dict, xlabel="iteration"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        ax.plot(np.arange(len(values)), values)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(path, curves: dict):
    names = list(curves)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration"] + names)
        for i in range(len(curves[names[0]])):
            writer.writerow([i] + [float(curves[n][i]) for n in names])


# -- (a) security audit -----------------------------------------------------------------------------------------

def task_attack(params, metric, num, iters, clamp=0.5, lr=0.05, kappa=1.0, closeness=1.0):
    """Untargeted attack on the initial noise (AdjointDPM's security audit, official attack.sh: Adam on x_T).

    Per sample: loss = relu(logit_c0 - max_{j != c0} logit_j + kappa) + closeness * ||x_0 - x_0^orig||^2 / D,
    with c0 the classifier's label of the original sample; the perturbation of x_T is clamped to |delta| <= clamp.
    Only samples the classifier labels as their conditioning class at the start are attacked.
    """
    key = jax.random.key(1)
    labels = jnp.arange(num) % 10
    cond = params["embed"][labels]
    x_T = jax.random.normal(key, (num, 8, 8, 1))
    classify = lambda x: metric.module.apply(metric.params, jnp.clip(x, -1.0, 1.0))  # noqa: E731
    x_orig = jax.jit(sample)(params["net"], x_T, cond)
    c0 = jnp.argmax(classify(x_orig), -1)
    valid = np.asarray(c0 == labels)

    def loss_fn(x_0):
        logits = classify(x_0)
        own = jnp.take_along_axis(logits, c0[:, None], -1)[:, 0]
        other = jnp.max(jnp.where(jax.nn.one_hot(c0, 10) > 0, -jnp.inf, logits), -1)
        margin = own - other
        dist = jnp.mean((x_0 - x_orig) ** 2, axis=(1, 2, 3))
        per_sample = jax.nn.relu(margin + kappa) + closeness * dist
        return jnp.sum(per_sample), (margin, dist, x_0)

    @jax.jit
    def step(delta, opt_state):
        (loss, (margin, dist, x_0)), grads = value_and_grad_through_sampling(
            loss_fn, eps_model, params["net"], x_T + delta, {"embedding": cond}, has_aux=True, **SAMPLER)
        updates, opt_state = tx.update(grads["x_T"], opt_state)
        delta = jnp.clip(delta + updates, -clamp, clamp)
        return delta, opt_state, loss, margin, dist, x_0

    tx = optax.adam(lr)
    delta = jnp.zeros_like(x_T)
    opt_state = tx.init(delta)
    curves = {"loss": [], "success_rate": [], "mean_pixel_mse": []}
    best_x = np.asarray(x_orig).copy()
    fooled = np.zeros(num, bool)
    for _ in range(iters):
        delta, opt_state, loss, margin, dist, x_0 = step(delta, opt_state)
        # margin/dist are those of the sample generated from the perturbation before this update
        now = np.asarray(margin) < 0
        newly = now & ~fooled
        best_x[newly] = np.asarray(x_0)[newly]  # keep the first successful (closest-so-far) adversarial sample
        fooled |= now
        curves["loss"].append(float(loss) / num)
        curves["success_rate"].append(float(np.mean(fooled[valid])))
        curves["mean_pixel_mse"].append(float(np.mean(np.asarray(dist)[valid])))
    final_labels = np.asarray(jnp.argmax(classify(jnp.asarray(best_x)), -1))
    success = (final_labels != np.asarray(c0)) & valid
    diff = (best_x - np.asarray(x_orig))[success]
    result = {
        "attacked": int(valid.sum()), "success_rate": float(success.sum() / max(valid.sum(), 1)),
        "pixel_rmse_successful": float(np.sqrt(np.mean(diff ** 2))) if success.any() else None,
        "pixel_linf_successful_mean": (float(np.mean(np.abs(diff).reshape(len(diff), -1).max(-1)))
                                       if success.any() else None),
        "mean_ink_before": float(np.mean(ink(x_orig))), "mean_ink_after": float(np.mean(ink(jnp.asarray(best_x)))),
        "delta_linf_max": float(jnp.max(jnp.abs(delta))), "iterations": iters, "clamp": clamp, "lr": lr,
    }
    show = np.flatnonzero(success)[:10] if success.any() else np.arange(min(num, 10))
    save_grid(os.path.join(OUT, f"task_a_attack_clamp{clamp:g}.png"), [np.asarray(x_orig)[show], best_x[show]],
              titles=[[f"label {int(c0[i])}" for i in show], [f"-> {int(final_labels[i])}" for i in show]],
              row_labels=["original", "adversarial x_T"])
    save_curves(os.path.join(OUT, f"task_a_curves_clamp{clamp:g}.png"), curves)
    write_csv(os.path.join(OUT, f"task_a_curves_clamp{clamp:g}.csv"), curves)
    return result


# -- (b) conditioning inversion -----------------------------------------------------------------------------------

def task_inversion(params, metric, train_images, batch, iters, lr=0.05):
    """Learn a new embedding e from the stroke-thickness metric alone: min_e E_{x_T} (ink(x_0(x_T, e)) - target)^2.

    Target: the 95th percentile of the training digits' mean ink (thick strokes); e starts at the mean of the ten
    class embeddings; fresh x_T every iteration so that the property is carried by e, not by the noise.
    """
    target = float(np.percentile(np.asarray(ink(jnp.asarray(train_images))), 95))
    e_init = jnp.mean(params["embed"][:10], axis=0)

    def loss_fn(x_0):
        return jnp.mean((ink(x_0) - target) ** 2), jnp.mean(ink(x_0))

    @jax.jit
    def step(e, opt_state, key):
        x_T = jax.random.normal(key, (batch, 8, 8, 1))
        (loss, mean_ink), grads = value_and_grad_through_sampling(
            loss_fn, eps_model, params["net"], x_T, {"embedding": jnp.broadcast_to(e, (batch, EMBED_DIM))}, wrt="cond",
            has_aux=True, **SAMPLER)
        updates, opt_state = tx.update(jnp.sum(grads["cond"]["embedding"], 0), opt_state)
        return optax.apply_updates(e, updates), opt_state, loss, mean_ink

    tx = optax.adam(lr)
    e = e_init
    opt_state = tx.init(e)
    curves = {"loss": [], "mean_ink": []}
    for i in range(iters):
        e, opt_state, loss, mean_ink = step(e, opt_state, jax.random.fold_in(jax.random.key(2), i))
        curves["loss"].append(float(loss))
        curves["mean_ink"].append(float(mean_ink))
    fresh = jax.random.normal(jax.random.key(3), (64, 8, 8, 1))
    gen = jax.jit(sample)
    before = gen(params["net"], fresh, jnp.broadcast_to(e_init, (64, EMBED_DIM)))
    after = gen(params["net"], fresh, jnp.broadcast_to(e, (64, EMBED_DIM)))

    def describe(x):
        logits = metric.module.apply(metric.params, jnp.clip(x, -1, 1))
        prob = jax.nn.softmax(logits, -1)
        return {"ink_mean": float(jnp.mean(ink(x))), "ink_std": float(jnp.std(ink(x))),
                "confident_share": float(jnp.mean(prob.max(-1) > 0.9)),
                "label_histogram": np.bincount(np.asarray(logits.argmax(-1)), minlength=10).tolist()}

    class_embed_cos = np.asarray(params["embed"][:10] @ e / (jnp.linalg.norm(params["embed"][:10], axis=-1)
                                                             * jnp.linalg.norm(e)))
    result = {"target_ink": target, "data_ink_mean": float(jnp.mean(ink(jnp.asarray(train_images)))),
              "before": describe(before), "after": describe(after), "iterations": iters, "batch": batch, "lr": lr,
              "embedding_norm_init": float(jnp.linalg.norm(e_init)),
              "embedding_norm_learned": float(jnp.linalg.norm(e)),
              "max_cosine_to_class_embeddings": float(class_embed_cos.max())}
    save_grid(os.path.join(OUT, "task_b_inversion.png"), [np.asarray(before)[:12], np.asarray(after)[:12]],
              row_labels=["initial e", "learned e"])
    save_curves(os.path.join(OUT, "task_b_curves.png"), curves)
    write_csv(os.path.join(OUT, "task_b_curves.csv"), curves)
    return result


# -- (c) stylisation finetuning ---------------------------------------------------------------------------------

def stripes(images):
    """The style domain: odd rows dimmed to a quarter of their ink (a horizontal-stripe texture)."""
    mask = np.where(np.arange(8) % 2 == 0, 1.0, 0.25).astype(np.float32)[None, :, None, None]
    return ((images + 1.0) / 2.0 * mask) * 2.0 - 1.0


def gram_features(metric, x):
    """Gatys-style features: the classifier's first two conv layers (pre-activation) and the raw pixels."""
    _, state = metric.module.apply(metric.params, jnp.clip(x, -1.0, 1.0), capture_intermediates=True,
                                   mutable=["intermediates"])
    inter = state["intermediates"]
    return [inter["conv_0_0"]["__call__"][0], inter["conv_0_1"]["__call__"][0], x]


def grams(metric, x):
    out = []
    for f in gram_features(metric, x):
        flat = f.reshape(f.shape[0], -1, f.shape[-1])
        out.append(jnp.einsum("bpc,bpd->bcd", flat, flat) / flat.shape[1])
    return out


def task_stylise(params, metric, train_images, test_images, batch, iters, lr=1e-4, anchor=1e-2, content=0.3):
    """Finetune the eps-model's params: min style + content * CE(classifier(x_0), y) + anchor ||theta - theta_0||^2.

    style = sum_layers ||G(x_0) - G_style||_F^2 / C^2 with G the Gram matrices of ``gram_features`` averaged over
    pixels and G_style their mean over the striped training digits. The content term (cross-entropy of the
    domain classifier w.r.t. the conditioning class y) keeps each sample the digit it was asked to be: without it
    the Gram loss alone is minimised by digit-less stripe textures (measured: class accuracy 0.84 -> 0.18, style
    loss below the real striped digits'). Labels and x_T are drawn afresh every iteration.
    """
    style_targets = [jnp.mean(g, 0) for g in grams(metric, jnp.asarray(stripes(train_images)))]
    theta_0 = params["net"]

    def style_loss(x_0):
        return sum(jnp.mean(jnp.sum((g - t) ** 2, axis=(1, 2))) / t.shape[0] ** 2
                   for g, t in zip(grams(metric, x_0), style_targets))

    def objective(x_0, labels):
        logits = metric.module.apply(metric.params, jnp.clip(x_0, -1.0, 1.0))
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        style = style_loss(x_0)
        return style + content * ce, (style, ce)

    @jax.jit
    def step(net, opt_state, key):
        k_x, k_y = jax.random.split(key)
        x_T = jax.random.normal(k_x, (batch, 8, 8, 1))
        labels = jax.random.randint(k_y, (batch,), 0, 10)
        (_, (loss, ce)), grads = value_and_grad_through_sampling(
            lambda x_0: objective(x_0, labels), eps_model, net, x_T, {"embedding": params["embed"][labels]}, wrt="params",
            has_aux=True, **SAMPLER)
        sq = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(net), jax.tree.leaves(theta_0)))
        grads = jax.tree.map(lambda g, a, b: g + 2 * anchor * (a - b), grads["params"], net, theta_0)
        updates, opt_state = tx.update(grads, opt_state, net)
        return optax.apply_updates(net, updates), opt_state, loss, ce, sq

    tx = optax.adam(lr)
    net = theta_0
    opt_state = tx.init(net)
    curves = {"style_loss": [], "content_ce": [], "param_shift_sq": []}
    for i in range(iters):
        net, opt_state, loss, ce, sq = step(net, opt_state, jax.random.fold_in(jax.random.key(4), i))
        curves["style_loss"].append(float(loss))
        curves["content_ce"].append(float(ce))
        curves["param_shift_sq"].append(float(sq))

    fresh = jax.random.normal(jax.random.key(5), (200, 8, 8, 1))
    labels = jnp.arange(200) % 10
    gen = jax.jit(sample)
    before = gen(params["net"], fresh, params["embed"][labels])
    after = gen(net, fresh, params["embed"][labels])
    styled_test, plain_test = stripes(test_images), test_images
    feats = lambda x: metric.features(np.clip(np.asarray(x), -1, 1))  # noqa: E731

    def fd(a, b):
        return frechet_distance(*statistics_from_features(feats(a)), *statistics_from_features(feats(b)))

    def diversity(x):
        flat = np.asarray(x).reshape(len(x), -1)
        d = np.sqrt(((flat[:, None] - flat[None]) ** 2).mean(-1))
        return float(d[np.triu_indices(len(x), 1)].mean())

    def accuracy(x):
        logits = metric.module.apply(metric.params, jnp.clip(x, -1, 1))
        return float(jnp.mean(jnp.argmax(logits, -1) == labels))

    result = {
        "style_loss_before": float(style_loss(before)), "style_loss_after": float(style_loss(after)),
        "style_loss_real_striped": float(style_loss(jnp.asarray(styled_test))),
        "style_loss_real_plain": float(style_loss(jnp.asarray(plain_test))),
        "fd_to_striped_digits_before": fd(before, styled_test), "fd_to_striped_digits_after": fd(after, styled_test),
        "fd_to_plain_digits_before": fd(before, plain_test), "fd_to_plain_digits_after": fd(after, plain_test),
        "fd_plain_vs_striped_real": fd(plain_test, styled_test),
        "diversity_before": diversity(before), "diversity_after": diversity(after),
        "diversity_real_striped": diversity(styled_test[:200]), "diversity_real_plain": diversity(plain_test[:200]),
        "class_accuracy_before": accuracy(before), "class_accuracy_after": accuracy(after),
        "iterations": iters, "batch": batch, "lr": lr, "anchor": anchor, "content": content,
    }
    save_grid(os.path.join(OUT, "task_c_stylise.png"),
              [np.asarray(before)[:10], np.asarray(after)[:10], styled_test[:10]],
              row_labels=["before", "finetuned", "style domain (real)"])
    save_curves(os.path.join(OUT, "task_c_curves.png"), curves)
    write_csv(os.path.join(OUT, "task_c_curves.csv"), curves)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("a", "b", "c", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="fewer samples and iterations (smoke run)")
    parser.add_argument("--clamps", default="0.1,0.25,0.5", help="task a: L-inf budgets on the x_T perturbation")
    parser.add_argument("--content", type=float, default=0.3, help="task c: weight of the content (class) term")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    summary_path = os.path.join(OUT, "tasks.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}

    train_images, train_labels = _digits("train")
    test_images, test_labels = _digits("test")
    start = time.perf_counter()
    metric = domain_metric("digits")
    print(f"classifier: test accuracy {metric.test_accuracy:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    params, path, train_s = load_or_train_eps_model(train_images, train_labels)
    print(f"eps-model: {path} (trained in {train_s:.0f} s)" if train_s else f"eps-model: loaded {path}", flush=True)

    # quality of the base model: class-conditional samples through the same sampler
    x_T = jax.random.normal(jax.random.key(0), (200, 8, 8, 1))
    labels = jnp.arange(200) % 10
    base = jax.jit(sample)(params["net"], x_T, params["embed"][labels])
    report = metric.evaluate(np.clip(np.asarray(base), -1, 1), test_images)
    logits = metric.module.apply(metric.params, jnp.clip(base, -1, 1))
    summary["base_model"] = {"frechet_to_test": report["frechet"], "confident_share": report["confident_share"],
                             "conditional_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == labels)),
                             "classifier_test_accuracy": metric.test_accuracy,
                             "frechet_train_vs_test": metric.frechet(train_images, test_images),
                             "train_seconds": train_s, "sampler": {k: str(v) for k, v in SAMPLER.items()}}
    save_grid(os.path.join(OUT, "base_samples.png"), [np.asarray(base)[i * 10:(i + 1) * 10] for i in range(4)])
    print("base model:", json.dumps(summary["base_model"]), flush=True)

    quick = args.quick

    def attacks():
        return {f"clamp_{c:g}": task_attack(params, metric, 20 if quick else 100, 5 if quick else 40, clamp=c)
                for c in (float(v) for v in args.clamps.split(","))}

    for name, run in (("a", attacks),
                      ("b", lambda: task_inversion(params, metric, train_images, 16 if quick else 32,
                                                   5 if quick else 60)),
                      ("c", lambda: task_stylise(params, metric, train_images, test_images, 16 if quick else 32,
                                                 5 if quick else 150, content=args.content))):
        if args.task not in (name, "all"):
            continue
        start = time.perf_counter()
        result = run()
        result["seconds"] = time.perf_counter() - start
        summary[f"task_{name}"] = result
        print(f"task {name}:", json.dumps(result), flush=True)
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1)
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
