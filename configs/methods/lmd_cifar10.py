"""LMD on the 8x8x4 latents of ``configs/vae_cifar10.py`` for GPU/TPU users (patch 1: 64 tokens; ViT-Tiny-sized
encoder, MAE's 8-block-narrow decoder shape shrunk to 2 blocks).

    dpmjax train --config configs/vae_cifar10.py --workdir runs/vae_cifar10
    dpmjax finetune --method lmd --teacher runs/vae_cifar10 --workdir runs/lmd_cifar10 \
        --config configs/methods/lmd_cifar10.py
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, schedule="cosine", start=0.15, end=0.75, steps=100_000)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="lmd", schedule=str(arg.schedule), start_ratio=float(arg.start), end_ratio=float(arg.end),
                    patch_size=1, hidden_size=192, depth=12, num_heads=3, decoder_hidden_size=128, decoder_depth=2,
                    decoder_num_heads=4, mlp_ratio=4.0, latent_scale=0.0, norm_patch_loss=False)
    c.data = dict(batch_size=512)
    c.optim = dict(learning_rate=1.5e-4 * 512 / 256, warmup_steps=5000, decay="cosine", weight_decay=0.05,
                   grad_clip=10.0)
    c.train = dict(num_steps=int(arg.steps), log_every=100, checkpoint_every=5000, keep_checkpoints=2,
                   sharding="replicate", ema_decay=0.0)
    c.lock()
    return c
