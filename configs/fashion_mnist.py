"""Class-conditional UNet on Fashion-MNIST (28x28) with label dropout for classifier-free guidance.

Needs Debian's dataset-fashion-mnist (``apt-get install dataset-fashion-mnist``: idx files under
/usr/share/datasets/fashion-mnist/).

    dpmjax train --config configs/fashion_mnist.py --workdir runs/fashion
    dpmjax sample --workdir runs/fashion --labels 0,7,9 --guidance-scale 3 --num 96
    dpmjax train --config configs/fashion_mnist.py:runlocal --workdir /tmp/fashion_smoke   # a few steps

Variants: ``runlocal`` (``configs/common.py``): 16 channels at one level, 10 steps at batch 16.
"""
from . import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    c = common.base()
    # ~300k parameters: 28 -> 14 -> 7, self-attention at 7x7; null class 10 for classifier-free guidance
    c.model = dict(kind="unet", model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,),
                   num_heads=4, dropout=0.0, num_groups=8, mid_attention=True, num_classes=10, label_dropout=0.1,
                   bfloat16=False)
    c.data = dict(name="fashion_mnist", image_shape=(28, 28, 1), batch_size=64, random_flip=False)
    c.optim.update(learning_rate=1e-3, warmup_steps=200, decay="cosine")
    c.train.update(num_steps=4000, ema_decay=0.999, log_every=50, checkpoint_every=500)
    c.sample.update(solver="dpmpp_2m", nfe=10, spacing="logSNR", num=1000, guidance_scale=2.0)
    if arg.runlocal:
        c.model = common.tiny_unet(num_classes=10, label_dropout=0.1)
        common.runlocal(c)
    c.lock()
    return c
