"""Unconditional UNet on scikit-learn's bundled 8x8 digits: the default, offline main job.

    dpmjax train --config configs/digits.py --workdir runs/digits
    dpmjax train --config configs/digits.py --workdir runs/digits --config.train.num_steps=200
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.schedule = dict(name="linear", num_train_timesteps=1000)
    # ~190k parameters: 8x8 -> 4x4 with self-attention at 4x4 (about 0.1 s per step at batch 128 on 2 cores)
    c.model = dict(kind="unet", model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                   num_heads=2, dropout=0.0, num_groups=8, mid_attention=True, bfloat16=False)
    c.data = dict(name="digits", image_shape=(8, 8, 1), batch_size=128, random_flip=False)
    c.optim = dict(learning_rate=2e-3, warmup_steps=100, decay="cosine", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=1500, target="eps", min_snr_gamma=0.0, ema_decay=0.995, log_every=50,
                   checkpoint_every=500, keep_checkpoints=3)
    c.sample = dict(solver="dpmpp_2m", nfe=10, spacing="logSNR", num=1000)
    c.lock()
    return c
