"""Scores of a few-shot adaptation (the shared setting of ``dpmjax.data.few_shot``): quality, diversity, copying.

    scores = adaptation_scores(samples, target.shots, target.heldout, features=embed)
    # {"fd": ..., "intra_diversity": ..., "nn_shot": ..., "nn_shot_heldout": ..., "copy_rate": ...}

  fd               Frechet distance between the samples and the held-out target images in the feature space
                   ``features`` (a function images -> [N, D], e.g. a frozen classifier's penultimate layer);
  intra_diversity  DomainStudio's Intra-cluster LPIPS (Ojha et al. 2021's protocol) in that feature space: each
                   sample joins the cluster of its nearest shot (feature distance), the mean pairwise distance
                   among each cluster's members is averaged over the clusters with two or more members. A model
                   that copies its K shots scores ~0; LPIPS itself needs VGG/AlexNet weights we cannot load offline;
  nn_shot          mean pixel L2 distance from a sample to its nearest shot (memorisation: 0 for a copy);
  nn_shot_heldout  the same for the held-out target images: what a model that generates the domain, rather than
                   its K shots, should score;
  copy_rate        the share of samples nearer (pixel L2) to a shot than ``copy_quantile`` (default 1 %) of the
                   held-out images are: a held-out image is a copy this often by chance, a memorising model far more.
"""
from __future__ import annotations

import numpy as np

__all__ = ["pairwise_distances", "nearest", "intra_cluster_diversity", "adaptation_scores"]


def pairwise_distances(a, b) -> np.ndarray:
    """[N, M] Euclidean distances between the rows of a [N, ...] and b [M, ...] (flattened, float64)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    squared = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def nearest(a, b) -> tuple[np.ndarray, np.ndarray]:
    """(index [N] of each row of ``a``'s nearest row of ``b``, its distance [N])."""
    distances = pairwise_distances(a, b)
    index = distances.argmin(axis=1)
    return index, distances[np.arange(len(index)), index]


def intra_cluster_diversity(sample_features, shot_features) -> tuple[float, int]:
    """(mean over clusters of the mean pairwise feature distance within the cluster, number of clusters counted):
    the samples are clustered by their nearest shot; clusters of fewer than two samples are skipped (as
    DomainStudio's evaluation does). NaN when no cluster has two members."""
    assignment, _ = nearest(sample_features, shot_features)
    per_cluster = []
    for cluster in range(len(shot_features)):
        members = np.asarray(sample_features)[assignment == cluster]
        if len(members) < 2:
            continue
        distances = pairwise_distances(members, members)
        per_cluster.append(distances[np.triu_indices(len(members), 1)].mean())
    return (float(np.mean(per_cluster)) if per_cluster else float("nan")), len(per_cluster)


def adaptation_scores(samples, shots, heldout, *, features, copy_quantile: float = 0.01) -> dict:
    """The module's scores of ``samples`` [N, H, W, C] against the ``shots`` [K, ...] and ``heldout`` [M, ...]
    target images (all in [-1, 1]); ``features(images) -> [N, D]``."""
    from dpmjax.metrics.fid import frechet_distance, statistics_from_features

    samples, shots, heldout = (np.asarray(x, np.float32) for x in (samples, shots, heldout))
    if not (samples.shape[1:] == shots.shape[1:] == heldout.shape[1:]):
        raise ValueError(f"samples {samples.shape}, shots {shots.shape} and held-out {heldout.shape} must share "
                         "the image shape")
    if not 0.0 < copy_quantile < 1.0:
        raise ValueError(f"copy_quantile must be in (0, 1), got {copy_quantile}")
    f_samples, f_shots, f_heldout = (np.asarray(features(x), np.float64) for x in (samples, shots, heldout))
    fd = frechet_distance(*statistics_from_features(f_samples), *statistics_from_features(f_heldout))
    diversity, clusters = intra_cluster_diversity(f_samples, f_shots)
    _, nn_samples = nearest(samples, shots)
    _, nn_heldout = nearest(heldout, shots)
    threshold = float(np.quantile(nn_heldout, copy_quantile))
    return {"fd": float(fd), "intra_diversity": diversity, "clusters": clusters, "nn_shot": float(nn_samples.mean()),
            "nn_shot_heldout": float(nn_heldout.mean()), "copy_rate": float(np.mean(nn_samples <= threshold))}
