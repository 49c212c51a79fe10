"""Latent diffusion on CIFAR-10 for GPU/TPU users: a class-conditional DiT (patch 1, 64 tokens) on the 8x8x4
latents of ``configs/vae_cifar10.py``, scaled by s = 1 / std (``dpmjax.data.latents``).

    dpmjax train --config configs/vae_cifar10.py --workdir runs/vae_cifar10
    dpmjax train --config configs/latent_cifar10.py:vae=runs/vae_cifar10 --workdir runs/latent_cifar10
    dpmjax sample --workdir runs/latent_cifar10 --num 64
"""
from . import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, vae="runs/vae_cifar10", steps=400_000)
    c = common.base()
    c.model = dict(kind="dit", patch_size=1, hidden_size=384, depth=12, num_heads=6, freq_dim=256, num_classes=10,
                   label_dropout=0.1, bfloat16=True)
    c.data = dict(name="tfds:cifar10", image_shape=(8, 8, 4), batch_size=256, random_flip=False,
                  kwargs=dict(image_key="image", label_key="label"),
                  latent=dict(vae_workdir=arg.vae, scale_factor=0.0))
    c.optim.update(learning_rate=1e-4, warmup_steps=5000, decay="constant")
    c.train.update(num_steps=arg.steps, ema_decay=0.9999, log_every=100, checkpoint_every=10_000)
    c.sample.update(solver="dpmpp_2m", nfe=20, spacing="logSNR", num=50_000, guidance_scale=1.5)
    if arg.runlocal:
        c.model.update(hidden_size=32, depth=1, num_heads=2, freq_dim=32, bfloat16=False)
        common.runlocal(c)
    c.lock()
    return c
