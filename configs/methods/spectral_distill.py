"""Spectral Diffusion on 8x8 digits (dpmjax/methods/spectral_distill.py): a slim UNet student, from scratch, with or
without wavelet gating and spectrum-aware distillation from the digits teacher (configs/digits.py, 173k params).

    dpmjax train --config configs/digits.py --workdir runs/digits                                    # the teacher
    dpmjax finetune --method spectral_distill --teacher runs/digits --workdir runs/digits_slim_wg_kd \\
        --config configs/methods/spectral_distill.py                                # slim + WG + distillation
    dpmjax finetune --method spectral_distill --teacher runs/digits --workdir runs/digits_slim \\
        --config configs/methods/spectral_distill.py:wg=false,distill=false         # the from-scratch baseline
    dpmjax sample --workdir runs/digits_slim_wg_kd --num 64

Variants: ``wg=true|false`` (the student's ``wavelet_gating``, default true), ``distill=true|false``
(lambda_s = lambda_f = 0.1 as in the paper, or 0: plain denoising training of the same student, the teacher
never runs), ``steps=N`` (default 2000, the teacher's budget), ``width=C`` (the student's model_channels, default 8),
``runlocal`` (a 4-update smoke run at batch 8 of a 4-channel student).

The student: the teacher's layout (8x8 -> 4x4, one ResBlock per level, no attention) at half the width
(model_channels 8 instead of 16): about 1/4 of the teacher's MACs. Trained like the teacher (AdamW 4e-3, warmup
100, cosine, batch 128, EMA 0.995, v-prediction: the teacher's target).
"""
import ml_collections

from dpmjax.config import parse_arg


def student_unet(wavelet_gating: bool, model_channels: int = 8) -> dict:
    """The slim digits student (the model section the output workdir samples)."""
    return dict(kind="unet", model_channels=model_channels, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(), num_heads=1, dropout=0.0, num_groups=4, mid_attention=False,
                bfloat16=False, wavelet_gating=bool(wavelet_gating))


def get_config(arg=None):
    arg = parse_arg(arg, wg=True, distill=True, steps=2000, width=8, runlocal=False)
    weight = 0.1 if arg.distill else 0.0
    width = 4 if arg.runlocal else arg.width  # runlocal: a 4-channel student compiles in seconds
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="spectral_distill", student_model=student_unet(arg.wg, width), lambda_spatial=weight,
                    lambda_freq=weight, alpha=-1.0, freq_eps=0.05)
    c.data = dict(batch_size=128)
    c.optim = dict(learning_rate=4e-3, warmup_steps=100, decay="cosine", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=arg.steps, log_every=50, checkpoint_every=500, keep_checkpoints=2, sharding="replicate",
                   ema_decay=0.995)
    if arg.runlocal:
        c.data.batch_size = 8
        c.optim.warmup_steps = 0
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.lock()
    return c
