"""Early exit by layer self-distillation on a CIFAR-10 DiT (accelerator scale; dpmjax/methods/early_exit.py).

There is no CIFAR-10 DiT config; the teacher is configs/fashion_mnist_dit.py retargeted to CIFAR-10 as a DiT-S/2
(patch 2, width 384, depth 12, 6 heads: 256 tokens), unconditional, eps (``tfds:cifar10`` needs network or a
prepared ``data_dir``):

    dpmjax train --config configs/fashion_mnist_dit.py --workdir runs/cifar10_dit \
        --config.data.name=tfds:cifar10 --config.data.image_shape=[32,32,3] --config.data.random_flip=true \
        --config.model.patch_size=2 --config.model.hidden_size=384 --config.model.depth=12 \
        --config.model.num_heads=6 --config.model.freq_dim=256 --config.model.num_classes=None \
        --config.model.label_dropout=0.0 --config.model.bfloat16=true --config.data.batch_size=128 \
        --config.train.num_steps=400000 --config.optim.learning_rate=1e-4 --config.sample.guidance_scale=1.0
    dpmjax finetune --method early_exit --teacher runs/cifar10_dit --workdir runs/cifar10_dit_exit \
        --config configs/methods/early_exit_cifar10.py
    dpmjax sample --workdir runs/cifar10_dit_exit --num 50000 --batch-size 500

Heads after blocks 4 and 8; the default schedule exits at block 4 for t > 0.7 and at block 8 for t > 0.4 (a third
and two thirds of the blocks saved there); 20k updates at batch 128, Adam 1e-4, EMA 0.999. Variants: those of
configs/methods/early_exit.py (``steps``, ``exits``, ``schedule``, ``heads_only``, ``distill``, ``exit_weight``).
"""
from dpmjax.config import configs_dir, load_config
import os


def get_config(arg=None):
    base = load_config(os.path.join(configs_dir(), "methods", "early_exit.py") + ":" + ",".join(
        ["steps=20000", "exits=4+8", "schedule=0.7@4+0.4@8"] + ([arg] if arg else [])))
    c = base.copy_and_resolve_references()
    with c.unlocked():
        c.data = dict(batch_size=128, image_shape=(32, 32, 3))
        c.optim.update(learning_rate=1e-4, warmup_steps=1000)
        c.train.update(log_every=100, checkpoint_every=2000, ema_decay=0.999)
    c.lock()
    return c
