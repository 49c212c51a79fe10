"""Class-conditional DiT (patch 4) on Fashion-MNIST: 2-4x faster per training step than the UNet config on a
2-core CPU (BENCHMARKS.md, training throughput), although it has 2.4x the parameters.

    dpmjax train --config configs/fashion_mnist_dit.py --workdir runs/fashion_dit
    dpmjax train --config configs/fashion_mnist_dit.py:runlocal --workdir /tmp/dit_smoke   # a few steps

Variants: ``runlocal`` (``configs/common.py``): depth 1, width 32, 10 steps at batch 16.
"""
from . import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    c = common.base()
    c.model = dict(kind="dit", patch_size=4, hidden_size=96, depth=4, num_heads=4, freq_dim=96, num_classes=10,
                   label_dropout=0.1, bfloat16=False)
    c.data = dict(name="fashion_mnist", image_shape=(28, 28, 1), batch_size=64, random_flip=False)
    c.optim.update(learning_rate=5e-4, warmup_steps=200, decay="cosine")
    c.train.update(num_steps=4000, ema_decay=0.999, log_every=50, checkpoint_every=500)
    c.sample.update(solver="dpmpp_2m", nfe=10, spacing="logSNR", num=1000, guidance_scale=2.0)
    if arg.runlocal:
        c.model.update(hidden_size=32, depth=1, num_heads=2, freq_dim=32)
        common.runlocal(c)
    c.lock()
    return c
