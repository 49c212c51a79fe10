"""KL autoencoder (``dpmjax.nn.vae``) on Fashion-MNIST: 28x28x1 images <-> 7x7x4 latents (f = 4, 4x fewer numbers),
the first stage of ``configs/latent_fashion_mnist.py`` and the latent space of ``--method lmd``.

Needs Debian's dataset-fashion-mnist (idx files under /usr/share/datasets/fashion-mnist/).

    dpmjax train --config configs/vae_fashion_mnist.py --workdir runs/vae_fashion
    dpmjax train --config configs/vae_fashion_mnist.py:steps=500 --workdir runs/vae_fashion_short
    dpmjax train --config configs/vae_fashion_mnist.py:runlocal --workdir /tmp/vae_smoke    # a few steps

Loss (``config.train``): ``vae_reconstruction`` "l1" (LDM's pixel loss) summed over pixels + ``vae_beta`` times the
KL to N(0, I) (LDM's kl_weight is 1e-6 at f = 8 on 256^2 images; this small latent takes a larger weight so the
latents stay near unit scale). No LPIPS or GAN term: ``dpmjax/nn/vae.py`` says why.

Variants: ``steps=N``; ``digits`` (8x8 digits -> 4x4x2 latents, one downsampling, for tests and smoke runs);
``runlocal`` (narrow network, 10 steps at batch 16).
"""
from . import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, digits=False, steps=2000)
    c = common.base()
    c.model = dict(kind="vae", channels=(16, 32, 32), latent_channels=4, image_shape=(28, 28, 1), num_groups=8,
                   bfloat16=False)
    c.data = dict(name="fashion_mnist", image_shape=(28, 28, 1), batch_size=64, random_flip=False)
    c.optim.update(learning_rate=1e-3, warmup_steps=100, decay="cosine")
    c.train.update(num_steps=arg.steps, objective="vae", vae_beta=1e-3, vae_reconstruction="l1", ema_decay=0.999,
                   log_every=50, checkpoint_every=500)
    if arg.digits:
        c.model.update(channels=(16, 32), latent_channels=2, image_shape=(8, 8, 1), num_groups=4)
        c.data.update(name="digits", image_shape=(8, 8, 1))
    if arg.runlocal:
        c.model.update(channels=tuple(8 for _ in c.model.channels), num_groups=4)
        common.runlocal(c)
    c.lock()
    return c
