"""SpeedUpNet on the digits cross-attention teacher (dpmjax/methods/speedupnet.py).

    dpmjax train --config configs/digits.py:xattn --workdir runs/digits_xattn        # labels as attention tokens
    dpmjax finetune --method speedupnet --teacher runs/digits_xattn --workdir runs/digits_sun \
        --config configs/methods/speedupnet.py
    dpmjax sample --workdir runs/digits_sun --labels 3          # 4 DDIM steps, one pass each, no guidance

Variants: ``steps=N`` (updates, 1500), ``w=S`` (the guidance scale folded in, 2.0 = the teacher's default),
``student_steps=K`` (4), ``msc=M`` (consecutive student steps per loss term, 2; 1 = step-wise distillation),
``substeps=M`` (teacher DPM-Solver++(2M) steps per student step, 5: a 20-step guided teacher), ``runlocal``
(4 updates at batch 8, a smoke run). Only the adapter trains (Adam 1e-2, constant, no EMA, batch 32: at 1e-3 the
zero-initialised alpha moves too slowly to matter in a CPU-sized run); no data is read.
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=1500, w=2.0, student_steps=4, msc=2, substeps=5, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="speedupnet", guidance_scale=float(arg.w), student_steps=int(arg.student_steps),
                    teacher_substeps=int(arg.substeps), teacher_solver="dpmpp_2m", msc_steps=int(arg.msc),
                    spacing=None, init="copy")
    c.data = dict(batch_size=32)
    c.optim = dict(learning_rate=1e-2, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=int(arg.steps), log_every=50, checkpoint_every=500, keep_checkpoints=2,
                   sharding="replicate", ema_decay=0.0)
    if arg.runlocal:
        c.data.batch_size = 8
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.lock()
    return c
