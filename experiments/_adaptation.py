"""What the adaptation experiments share (experiment helper, not a script): sampling a workdir's network,
the target-domain feature space, sample grids.

    from _adaptation import grid, sampler, target_features
    run = sampler(model, schedule, prediction, sample_settings(config))    # jitted (params, x_T) -> images
    scores = adaptation_scores(run(params, x_T), shots, heldout, features=target_features("invert"))

Used by experiments/adaptation.py (quality: plain finetuning, DomainStudio, LoRA, QST), adaptation_cost.py (memory,
step time, quality of full finetuning / LoRA / QST) and dare.py (pruned deltas).
"""
from __future__ import annotations

# style transforms that are their own inverse: samples are mapped back to the source style before the digits
# classifier (trained on upright white-on-black digits) embeds them
SELF_INVERSE = ("invert", "mirror", "none")


def sampler(model, schedule, prediction, settings):
    """jitted (params, x_T) -> samples in [-1, 1] of ``model`` (the teacher's module, or an output workdir's own
    network: QST's backbone plus side network) with ``settings``' solver, NFE and spacing."""
    import jax
    import jax.numpy as jnp

    from dpmjax.nn import make_apply_fn
    from dpmjax.samplers.driver import plan, sample

    apply_fn = make_apply_fn(model, schedule)
    times = plan(schedule, settings["solver"], nfe=settings["nfe"], spacing=settings["spacing"]).grid["t"]

    @jax.jit
    def run(params, x_T):
        x_0 = sample(lambda x, t: apply_fn(params, x, t), x_T, schedule=schedule, solver=settings["solver"],
                     timesteps=times, prediction=prediction)
        return jnp.clip(x_0, -1.0, 1.0)

    return run


def target_features(transform: str):
    """images -> [N, 64]: the seed-0 digits classifier's penultimate features of the images mapped back to the
    source style (``invert`` / ``mirror`` undo themselves; ``dilate`` is embedded as is)."""
    import jax
    import numpy as np

    from dpmjax.data.few_shot import style_transform
    from dpmjax.metrics.features import feature_network

    net = feature_network("classifier:digits", image_shape=(8, 8, 1))
    apply = jax.jit(net.apply)
    inverse = transform if transform in SELF_INVERSE else "none"
    return lambda images: np.asarray(apply(net.params, style_transform(np.asarray(images), inverse)))


def grid(images, path, columns=16):
    """Save up to 4 rows of ``columns`` 8x8 gray images in [-1, 1] as one PNG (1-pixel white gaps)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    images = np.asarray(images)[:columns * 4]
    rows = int(np.ceil(len(images) / columns))
    canvas = np.ones((rows * 9, columns * 9))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = (image[..., 0] + 1) / 2
    plt.imsave(path, canvas, cmap="gray", vmin=0, vmax=1)
