"""DDPM-style UNet on CIFAR-10 from TFDS, for GPU/TPU users (``tfds:cifar10`` needs network or a prepared
``data_dir``).

    dpmjax train --config configs/cifar10.py --workdir runs/cifar10
    dpmjax train --config configs/cifar10.py:v --workdir runs/cifar10_v --config.data.batch_size=256
    dpmjax train --config configs/cifar10.py --workdir runs/cifar10 --config.train.sharding=fsdp   # pods

Variants (``configs/common.py``): ``v`` trains with v-prediction and min-SNR-5 weighting; ``xattn`` makes it
class-conditional through cross-attention only (the label as 4 learned tokens of width 256, ``model.label_tokens``,
label dropout 0.1 for classifier-free guidance at scale 3): the teacher of ``configs/methods/speedupnet_cifar10.py``;
``runlocal`` shrinks the UNet to two levels of 32/64 channels and 10 steps at batch 16 (runs on TFDS mock data in
the tests).
"""
from . import common


def get_config(arg=None):
    arg = common.parse_arg(arg, v=False, runlocal=False, xattn=False)
    c = common.base()
    c.model = dict(kind="unet", model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                   attention_resolutions=(16,), num_heads=4, dropout=0.1, num_groups=32, mid_attention=True,
                   bfloat16=True)
    c.data = dict(name="tfds:cifar10", image_shape=(32, 32, 3), batch_size=128, random_flip=True,
                  kwargs=dict(image_key="image", label_key="label"))
    c.optim.update(learning_rate=2e-4, warmup_steps=5000, decay="constant")
    c.train.update(num_steps=800_000, ema_decay=0.9999, log_every=100, checkpoint_every=10_000)
    c.sample.update(solver="dpmpp_2m", nfe=10, spacing="logSNR", num=50_000)
    if arg.v:
        c.train.target = "v"
        c.train.min_snr_gamma = 5.0
    if arg.xattn:
        c.model.update(num_classes=10, label_dropout=0.1, context_dim=256, label_tokens=4)
        c.sample.guidance_scale = 3.0
    if arg.runlocal:
        c.model.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                       num_groups=8, dropout=0.0, bfloat16=False)
        common.runlocal(c)
    c.lock()
    return c
