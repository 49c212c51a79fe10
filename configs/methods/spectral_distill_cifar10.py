"""Spectral Diffusion at accelerator scale: a slim wavelet-gating UNet distilled from the converted
google/ddpm-cifar10-32 UNet (35.7M params, eps) with spectrum-aware distillation (dpmjax/methods/spectral_distill.py).

    dpmjax convert --from-diffusers /path/to/ddpm-cifar10-32 --out runs/ddpm_cifar10          # the teacher
    dpmjax finetune --method spectral_distill --teacher runs/ddpm_cifar10 --workdir runs/cifar10_slim_wg_kd \\
        --config configs/methods/spectral_distill_cifar10.py
    dpmjax finetune --method spectral_distill --teacher runs/ddpm_cifar10 --workdir runs/cifar10_slim \\
        --config configs/methods/spectral_distill_cifar10.py:wg=false,distill=false     # from-scratch baseline
    dpmjax sample --workdir runs/cifar10_slim_wg_kd --num 50000

The student: an ADM UNet with model_channels 48, channel_mult (1, 2, 2, 2) (32, 16, 8, 4: the teacher's
resolutions, so every level is matched), 2 ResBlocks per level, attention at 16x16 and in the middle, dropout 0.1,
wavelet gating: 6.0M parameters and 0.85 GMACs per forward against the teacher's 5.86 GMACs (1/6.9; XLA cost
analysis of the lowered forward at batch 1, flops / 2). The data are CIFAR-10 through TFDS (``tfds:cifar10``, the
teacher's dataset; it must be prepared offline). Variants: ``wg``, ``distill`` (as configs/methods/spectral_distill.py),
``steps=N`` (default 200k: the paper trains its students from scratch for the teacher's budget; DDPM's CIFAR-10
model took 800k at batch 128). AdamW 2e-4, warmup 5000, constant, batch 128, EMA 0.9999, FSDP.
"""
import ml_collections

from dpmjax.config import parse_arg


def student_unet(wavelet_gating: bool) -> dict:
    return dict(kind="unet", model_channels=48, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                attention_resolutions=(16,), num_heads=1, dropout=0.1, num_groups=32, mid_attention=True,
                bfloat16=False, wavelet_gating=bool(wavelet_gating))


def get_config(arg=None):
    arg = parse_arg(arg, wg=True, distill=True, steps=200_000)
    weight = 0.1 if arg.distill else 0.0
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="spectral_distill", student_model=student_unet(arg.wg), lambda_spatial=weight,
                    lambda_freq=weight, alpha=-1.0, freq_eps=0.05)
    c.data = dict(batch_size=128, random_flip=True)
    c.optim = dict(learning_rate=2e-4, warmup_steps=5000, decay="constant", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=arg.steps, log_every=100, checkpoint_every=5000, keep_checkpoints=2, sharding="fsdp",
                   ema_decay=0.9999)
    c.lock()
    return c
