"""KL autoencoder on CIFAR-10 for GPU/TPU users: 32x32x3 images <-> 8x8x4 latents (f = 4, LDM's KL-f4 shape
family), the first stage of ``configs/latent_cifar10.py`` (``tfds:cifar10`` needs network or a prepared data_dir).

    dpmjax train --config configs/vae_cifar10.py --workdir runs/vae_cifar10
    dpmjax train --config configs/vae_cifar10.py:runlocal --workdir /tmp/vae_cifar_smoke

Loss: L1 summed over pixels + 1e-4 KL (``dpmjax/nn/vae.py``; no LPIPS / GAN term, see there).
"""
from . import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, steps=100_000)
    c = common.base()
    c.model = dict(kind="vae", channels=(64, 128, 256), latent_channels=4, image_shape=(32, 32, 3), num_groups=32,
                   bfloat16=False)
    c.data = dict(name="tfds:cifar10", image_shape=(32, 32, 3), batch_size=128, random_flip=True,
                  kwargs=dict(image_key="image", label_key="label"))
    c.optim.update(learning_rate=4.5e-6 * 128, warmup_steps=1000, decay="cosine")
    c.train.update(num_steps=arg.steps, objective="vae", vae_beta=1e-4, vae_reconstruction="l1", ema_decay=0.999,
                   log_every=100, checkpoint_every=5000)
    if arg.runlocal:
        c.model.update(channels=(8, 8, 8), num_groups=4)
        common.runlocal(c)
    c.lock()
    return c
