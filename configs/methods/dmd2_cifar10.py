"""DMD2 at paper scale: a 1-step (or 4-step) CIFAR-10 generator distilled from the converted
google/ddpm-cifar10-32 teacher (needs a GPU / TPU; dpmjax/methods/dmd2.py).

    dpmjax convert --from-diffusers /path/to/ddpm-cifar10-32 --out runs/ddpm_cifar10          # the teacher
    dpmjax finetune --method dmd2 --teacher runs/ddpm_cifar10 --workdir runs/cifar10_dmd2 \
        --config configs/methods/dmd2_cifar10.py                     # :steps=4 for the 4-step generator
    python experiments/fid_vs_nfe.py --workdir runs/cifar10_dmd2 --solvers renoise --nfe 1             # FID

The official ImageNet-64 recipe (tianweiy/DMD2 experiments/imagenet): AdamW for generator and fake score at
the same lr 2e-6, weight decay 0.01, gradient clip 10, TTUR 5 fake-score updates per generator update, GAN
weights 1e-2 (critic) / 3e-3 (generator) on the fake score's bottleneck, DM times in [0.02, 0.98] of the
schedule, 7 GPUs x batch 40 for 200k-400k generator updates, bf16 (fp16 diverges). The teacher here is the
DDPM CIFAR-10 UNet (35.7M parameters, eps-prediction) rather than EDM; the batch is 256 and fsdp shards the
two networks and their optimizer states over the data axis. Real CIFAR-10 images (for the GAN term only)
come through TFDS (a prepared data_dir, or network). Variants: steps=N, gan=false (the paper's "w/o GAN"
row: FID 2.61 on ImageNet-64 against 1.28 with it), ttur=N.

The GAN head reads the fake score network's mid block, which the converted diffusers UNet2DModel returns
(``return_bottleneck``) as dpmjax's own UNet does, so the converted teacher takes the full recipe.
"""
from dpmjax.config import parse_arg

from . import dmd2


def get_config(arg=None):
    arg = parse_arg(arg, steps=1, gan=True, ttur=5)
    c = dmd2.get_config(f"steps={arg.steps},gan={str(arg.gan).lower()},ttur={arg.ttur}")
    with c.unlocked():
        c.data = dict(name="tfds:cifar10", image_shape=(32, 32, 3), kwargs=dict(image_key="image", label_key="label"),
                      batch_size=256, random_flip=True)
        c.optim.update(learning_rate=2e-6, weight_decay=0.01, grad_clip=10.0)
        c.train.update(num_steps=1_000_000, log_every=100, checkpoint_every=5000, sharding="fsdp", ema_decay=0.999)
    return c
