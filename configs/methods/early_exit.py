"""Early exit by layer self-distillation (GO-LSD after D-FINE) on a digits DiT teacher
(dpmjax/methods/early_exit.py).

    # the teacher: configs/fashion_mnist_dit.py retargeted to unconditional 8x8 digits, depth 6
    dpmjax train --config configs/fashion_mnist_dit.py --workdir runs/digits_dit \
        --config.data.name=digits --config.data.image_shape=[8,8,1] --config.data.batch_size=128 \
        --config.model.patch_size=2 --config.model.hidden_size=64 --config.model.depth=6 \
        --config.model.freq_dim=64 --config.model.num_classes=None --config.model.label_dropout=0.0 \
        --config.train.num_steps=3000 --config.sample.guidance_scale=1.0 --config.sample.spacing=karras
    dpmjax finetune --method early_exit --teacher runs/digits_dit --workdir runs/digits_dit_exit \
        --config configs/methods/early_exit.py
    dpmjax sample --workdir runs/digits_dit_exit        # blocks 0-3 + head 4 for t > 0.6, the full DiT below

Variants: ``steps=N`` (updates, 1500), ``exits=2+4`` (the heads' block counts, "+"-separated), ``schedule=0.6@4``
(exit at block k for t > t_k, entries "t@k" joined by "+", e.g. ``schedule=0.8@2+0.5@4``), ``heads_only`` (freeze
the trunk: the full-depth model stays the teacher), ``distill=W`` / ``exit_weight=W`` (the loss weights),
``runlocal`` (4 updates at batch 8, a smoke run). The data is the teacher's (digits train split), batch 128,
Adam 5e-4 constant, EMA 0.995.
"""
import ml_collections

from dpmjax.config import parse_arg


def _schedule(text: str):
    entries = []
    for item in str(text).split("+"):
        threshold, _, block = item.partition("@")
        entries.append((float(threshold), int(block)))
    return tuple(entries)


def get_config(arg=None):
    arg = parse_arg(arg, steps=1500, exits="2+4", schedule="0.6@4", heads_only=False, distill=1.0, exit_weight=1.0,
                    runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="early_exit", exit_blocks=tuple(int(k) for k in str(arg.exits).split("+")),
                    exit_schedule=_schedule(arg.schedule), exit_loss_weight=float(arg.exit_weight),
                    distill_weight=float(arg.distill), train_trunk=not arg.heads_only, init_heads="copy")
    c.data = dict(batch_size=128)
    c.optim = dict(learning_rate=5e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=int(arg.steps), log_every=50, checkpoint_every=500, keep_checkpoints=2,
                   sharding="replicate", ema_decay=0.995)
    if arg.runlocal:
        c.data.batch_size = 8
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2, ema_decay=0.0)
    c.lock()
    return c
