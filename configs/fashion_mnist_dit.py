"""Class-conditional DiT (patch 4) on Fashion-MNIST: 2-4x faster per training step than the UNet config on a
2-core CPU (BENCHMARKS.md, training throughput), although it has 2.4x the parameters.

    dpmjax train --config configs/fashion_mnist_dit.py --workdir runs/fashion_dit
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.schedule = dict(name="linear", num_train_timesteps=1000)
    c.model = dict(kind="dit", patch_size=4, hidden_size=96, depth=4, num_heads=4, freq_dim=96, num_classes=10,
                   label_dropout=0.1, bfloat16=False)
    c.data = dict(name="fashion_mnist", image_shape=(28, 28, 1), batch_size=64, random_flip=False)
    c.optim = dict(learning_rate=5e-4, warmup_steps=200, decay="cosine", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=4000, target="eps", min_snr_gamma=0.0, ema_decay=0.999, log_every=50,
                   checkpoint_every=500, keep_checkpoints=3)
    c.sample = dict(solver="dpmpp_2m", nfe=10, spacing="logSNR", num=1000, guidance_scale=2.0)
    c.lock()
    return c
