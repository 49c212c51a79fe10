"""Latent diffusion on Fashion-MNIST: a class-conditional DiT (patch 1, 49 tokens) on the 7x7x4 latents of a
trained VAE workdir (``configs/vae_fashion_mnist.py``), scaled by s = 1 / std (``dpmjax.data.latents``).

    dpmjax train --config configs/vae_fashion_mnist.py --workdir runs/vae_fashion
    dpmjax train --config configs/latent_fashion_mnist.py:vae=runs/vae_fashion --workdir runs/latent_fashion
    dpmjax sample --workdir runs/latent_fashion --num 64 --labels 0,7,9      # decoded PNG grid + npz of images

``config.data.image_shape`` is the *latent* shape; a VAE that encodes to another shape is refused before any
work, naming ``config.data.latent.vae_workdir``. ``config.data.latent.scale_factor`` > 0 fixes s.

Variants: ``vae=DIR`` (default runs/vae_fashion); ``steps=N``; ``digits`` (4x4x2 latents of
``configs/vae_fashion_mnist.py:digits``); ``runlocal`` (one block of width 32, 10 steps at batch 16).
"""
from . import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, digits=False, vae="runs/vae_fashion", steps=3000)
    c = common.base()
    c.model = dict(kind="dit", patch_size=1, hidden_size=96, depth=4, num_heads=4, freq_dim=96, num_classes=10,
                   label_dropout=0.1, bfloat16=False)
    c.data = dict(name="fashion_mnist", image_shape=(7, 7, 4), batch_size=64, random_flip=False,
                  latent=dict(vae_workdir=arg.vae, scale_factor=0.0))
    c.optim.update(learning_rate=5e-4, warmup_steps=200, decay="cosine")
    c.train.update(num_steps=arg.steps, ema_decay=0.999, log_every=50, checkpoint_every=500)
    c.sample.update(solver="dpmpp_2m", nfe=10, spacing="logSNR", num=100, guidance_scale=2.0)
    if arg.digits:
        c.data.update(name="digits", image_shape=(4, 4, 2))
    if arg.runlocal:
        c.model.update(hidden_size=32, depth=1, num_heads=2, freq_dim=32)
        common.runlocal(c)
    c.lock()
    return c
