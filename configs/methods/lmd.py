"""LMD (Latent Masking Diffusion, dpmjax/methods/lmd.py): an MAE on the latents of a frozen VAE workdir, with the
masking ratio rising 0.15 -> 0.75 over training.

    dpmjax train --config configs/vae_fashion_mnist.py --workdir runs/vae_fashion
    dpmjax finetune --method lmd --teacher runs/vae_fashion --workdir runs/lmd_fashion
    dpmjax finetune --method lmd --teacher runs/vae_fashion --workdir runs/lmd_linear \
        --config configs/methods/lmd.py:schedule=linear
    dpmjax finetune --method lmd --teacher runs/vae_fashion --workdir runs/mae_fashion \
        --config configs/methods/lmd.py:schedule=fixed                       # MAE's constant 0.75 (the baseline)

Variants: ``schedule=cosine|linear|piecewise|fixed`` (cosine: the official code's default), ``start=R`` / ``end=R``
(the ratios, each in (0, 1)), ``steps=N`` (1500), ``runlocal`` (4 updates at batch 16, a one-block encoder).
Data: the VAE's dataset (train split), batch 128; AdamW 1e-3 with 100 warmup steps and cosine decay (MAE's recipe
shape; LMD uses Adan), weight decay 0.05 as LMD's pretrain.sh; no EMA (the probe and the errors read the last
params).
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, schedule="cosine", start=0.15, end=0.75, steps=1500, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="lmd", schedule=str(arg.schedule), start_ratio=float(arg.start), end_ratio=float(arg.end),
                    patch_size=1, hidden_size=64, depth=4, num_heads=4, decoder_hidden_size=32, decoder_depth=1,
                    decoder_num_heads=2, mlp_ratio=4.0, latent_scale=0.0, norm_patch_loss=False)
    c.data = dict(batch_size=128)
    c.optim = dict(learning_rate=1e-3, warmup_steps=100, decay="cosine", weight_decay=0.05, grad_clip=10.0)
    c.train = dict(num_steps=int(arg.steps), log_every=50, checkpoint_every=500, keep_checkpoints=2,
                   sharding="replicate", ema_decay=0.0)
    if arg.runlocal:
        c.method.update(hidden_size=16, depth=1, num_heads=2, decoder_hidden_size=8, decoder_num_heads=2)
        c.data.batch_size = 16
        c.optim.warmup_steps = 0
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.lock()
    return c
