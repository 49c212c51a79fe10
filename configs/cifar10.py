"""DDPM-style UNet on CIFAR-10 from TFDS, for GPU/TPU users (``tfds:cifar10`` needs network or a prepared
``data_dir``). Variants: ``configs/cifar10.py:v`` trains with v-prediction and min-SNR-5 weighting.

    dpmjax train --config configs/cifar10.py --workdir runs/cifar10
    dpmjax train --config configs/cifar10.py:v --workdir runs/cifar10_v --config.data.batch_size=256
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.schedule = dict(name="linear", num_train_timesteps=1000)
    c.model = dict(kind="unet", model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                   attention_resolutions=(16,), num_heads=4, dropout=0.1, num_groups=32, mid_attention=True,
                   bfloat16=True)
    c.data = dict(name="tfds:cifar10", image_shape=(32, 32, 3), batch_size=128, random_flip=True,
                  kwargs=dict(image_key="image", label_key="label"))
    c.optim = dict(learning_rate=2e-4, warmup_steps=5000, decay="constant", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=800_000, target="eps", min_snr_gamma=0.0, ema_decay=0.9999, log_every=100,
                   checkpoint_every=10_000, keep_checkpoints=3)
    c.sample = dict(solver="dpmpp_2m", nfe=10, spacing="logSNR", num=50_000)
    if arg == "v":
        c.train.target = "v"
        c.train.min_snr_gamma = 5.0
    elif arg not in (None, ""):
        raise ValueError(f"configs/cifar10.py: unknown variant {arg!r} (known: 'v')")
    c.lock()
    return c
