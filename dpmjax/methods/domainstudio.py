"""DomainStudio (Zhu, Ma, Chen, Yuan 2023, "Fine-Tuning Diffusion Models for Domain-Driven Image Generation
using Limited Data", arXiv 2306.14153): few-shot adaptation that keeps the source model's diversity.

Plain finetuning on K = 10 images copies them. DomainStudio finetunes every weight on the denoising loss plus
terms that tie the adapted model eps_ada to the frozen source eps_src, both run on the *same* noisy targets
x_t = alpha_t x_0 + sigma_t eps and read as x0-predictions x0_src, x0_ada (``dpmjax.parameterization.to_x0``):

  relative-distance preservation (the paper's eq. 4-6): for each anchor i of the batch, the cosine
  similarities to the other rows j != i, softmax over j,
      p_i = softmax_j cos(x0_src_i, x0_src_j),   q_i = softmax_j cos(x0_ada_i, x0_ada_j)
      L_sim = mean_i KL(p_i || q_i)
  the same on the high-frequency components HF(x) = LH + HL + HH of a Haar DWT (eq. 7-8):  L_hf_sim;
  high-frequency detail of the targets (eq. 9):  L_hf_mse = mean || HF(x0_ada) - HF(x_0) ||^2;
  total (the official unconditional flags --pair_weight 4 --hf_pair_weight 4 --hf_mse_weight 1):
      L = L_simple + 4 L_sim + 4 L_hf_sim + 1 L_hf_mse.

Haar DWT by ``dpmjax.nn.wavelets.haar_dwt`` in ``jnp``: the 2x2 stride-2 filters of the official ``get_wave`` (L = [1, 1]/sqrt2,
H = [-1, 1]/sqrt2, LH = L^T H, ...) are a reshape and four sums, so no wavelet package is needed: jaxwt 0.1.1
(last release 2024-02) would add a dependency and its own padding conventions for ten lines that a test checks
against the official depthwise convolution.

Choices where the official code is specific (written down, overridable in the config):
  * the official code compares ``sim_size = 3`` rows, its batch per GPU; here ``method.sim_size`` (default 0:
    the whole batch) picks the first rows of the (shuffled) batch: more pairs per update at batch 8;
  * the KL is summed over j and averaged over the anchors (``F.kl_div(log q, p)``'s batchmean);
  * no L_vb: dpmjax networks predict eps / x0 / v with a fixed variance (the official ADM learns sigma);
  * a class-conditional teacher is adapted with the batch's labels fed to both networks.

config.method: pair_weight, hf_pair_weight, hf_mse_weight, sim_size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.methods import adaptation
from dpmjax.methods.base import Method, Program, Teacher, method_settings
from dpmjax.nn.wavelets import haar_dwt
from dpmjax.parameterization import to_x0

__all__ = ["METHOD", "build", "validate", "haar_dwt", "high_frequency", "relative_distance_kl", "domainstudio_terms"]

DEFAULTS = dict(pair_weight=4.0, hf_pair_weight=4.0, hf_mse_weight=1.0, sim_size=0)


def high_frequency(x):
    """HF(x) = LH + HL + HH of ``haar_dwt`` (the official ``hf`` images), [B, H/2, W/2, C]."""
    _, lh, hl, hh = haar_dwt(x)
    return lh + hl + hh


def _similarity_log_softmax(x):
    """[N, N-1]: for each row i, log softmax over j != i of cos(x_i, x_j) (rows flattened)."""
    flat = x.reshape(x.shape[0], -1)
    unit = flat / jnp.maximum(jnp.linalg.norm(flat, axis=1, keepdims=True), 1e-8)
    cosine = unit @ unit.T
    n = x.shape[0]
    off_diagonal = ~np.eye(n, dtype=bool)
    others = cosine[off_diagonal].reshape(n, n - 1)
    return jax.nn.log_softmax(others, axis=1)


def relative_distance_kl(source, adapted):
    """mean_i KL(softmax_j cos(source_i, source_j) || softmax_j cos(adapted_i, adapted_j)), j != i (eq. 6).
    ``source`` gets no gradient (the frozen model's side)."""
    log_p = jax.lax.stop_gradient(_similarity_log_softmax(source))
    log_q = _similarity_log_softmax(adapted)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=1))


def domainstudio_terms(x0_source, x0_adapted, x0_clean, sim_size: int = 0) -> dict:
    """{"sim", "hf_sim", "hf_mse"}: the three DomainStudio terms of a batch of x0-predictions (see module doc);
    ``sim_size`` > 0 compares the first ``sim_size`` rows only."""
    rows = slice(0, sim_size) if sim_size else slice(None)
    hf_adapted = high_frequency(x0_adapted)
    return {"sim": relative_distance_kl(x0_source[rows], x0_adapted[rows]),
            "hf_sim": relative_distance_kl(high_frequency(x0_source[rows]), hf_adapted[rows]),
            "hf_mse": jnp.mean((hf_adapted - high_frequency(x0_clean)) ** 2)}


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting: unknown settings, negative weights, sim_size of 1 or above the batch, an
    odd image side (no Haar DWT), the target data (``adaptation.check_target_data``)."""
    m = method_settings(config, DEFAULTS)
    unknown = sorted(set(m) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown domainstudio settings {unknown}; known: {sorted(DEFAULTS)}")
    for name in ("pair_weight", "hf_pair_weight", "hf_mse_weight"):
        value = m[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise ValueError(f"config.method.{name} must be a finite number >= 0, got {value!r}")
    size, batch = m["sim_size"], int(config.data.batch_size)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0 or size == 1 or size > batch:
        raise ValueError(f"config.method.sim_size must be 0 (the whole batch) or in [2, batch_size={batch}], "
                         f"got {size!r}")
    if batch < 2:
        raise ValueError(f"config.data.batch_size must be >= 2 (relative distances need pairs), got {batch}")
    height, width = teacher.image_shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"the teacher's images are {height}x{width}: the Haar DWT of DomainStudio needs even sides")
    adaptation.check_target_data(config)


def build(config, teacher: Teacher) -> Program:
    """Init copies the source model; each update is L_simple + the weighted DomainStudio terms."""
    m = method_settings(config, DEFAULTS)
    apply = adaptation.training_apply_fn(teacher)
    schedule, prediction = teacher.schedule, teacher.prediction
    weights = {"sim": float(m["pair_weight"]), "hf_sim": float(m["hf_pair_weight"]), "hf_mse": float(m["hf_mse_weight"])}
    sim_size = int(m["sim_size"])

    def init(frozen, key):
        return jax.tree.map(jnp.copy, frozen["teacher"])

    def loss(params, frozen, batch, key):
        noise_key, model_key = jax.random.split(key)
        x_t, t, target = adaptation.noised(batch, noise_key, schedule, prediction)
        labels = batch.get("label")
        out = apply(params, x_t, t, labels, model_key).astype(x_t.dtype)
        out_source = jax.lax.stop_gradient(apply(frozen["teacher"], x_t, t, labels, model_key).astype(x_t.dtype))
        simple = jnp.mean((out - target) ** 2)
        terms = domainstudio_terms(to_x0(out_source, x_t, t, schedule, prediction),
                                   to_x0(out, x_t, t, schedule, prediction), batch["image"], sim_size)
        total = simple + sum(weights[name] * terms[name] for name in weights)
        return total, {"simple": simple, **terms}

    return adaptation.student_program(config, teacher, init=init, loss=loss, student=lambda params: params,
                                      frozen={"teacher": teacher.params},
                                      metric_names=("simple", "sim", "hf_sim", "hf_mse"))


METHOD = Method(name="domainstudio", build=build, validate=validate,
                doc="DomainStudio: few-shot finetuning that keeps the source's relative distances (+ Haar HF terms)")
