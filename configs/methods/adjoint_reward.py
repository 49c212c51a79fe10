"""AdjointDPM reward finetuning (dpmjax/methods/adjoint_reward.py): ascend a differentiable reward of the
probability-flow ODE's samples, gradients by the continuous adjoint. The default task is PRDP's experiment's: make
the unconditional digits teacher draw 3s (reward log p(3 | x) of the seed-0 digits classifier), with PRDP's
budget in configs/methods/prdp.py: 200 updates of 16 samples = 3200 reward queries, AdamW lr 3e-5.

    dpmjax train --config configs/digits.py --workdir runs/digits                                  # the teacher
    dpmjax finetune --method adjoint_reward --teacher runs/digits --workdir runs/digits_adjoint
    dpmjax finetune --method adjoint_reward --teacher runs/digits --workdir runs/digits_adjoint_ckpt \\
        --config configs/methods/adjoint_reward.py:adjoint=checkpoint       # the exact discretised gradient
    dpmjax sample --workdir runs/digits_adjoint --num 64                              # heun, 10 NFE: the trained map

Variants: ``reward=SPEC`` (a differentiable one: ``classifier:...``; JPEG is refused), ``adjoint=`` backsolve |
checkpoint | scan, ``steps=N`` (heun steps: 2N model calls forward), ``batch=B`` (reward queries per update),
``runlocal`` (2 updates of 4 samples, 2 steps: a smoke test).
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, reward="classifier:digits:3", adjoint="backsolve", steps=5, batch=16, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="adjoint_reward", reward=arg.reward, batch=arg.batch, steps=arg.steps, adjoint=arg.adjoint,
                    solver=None, spacing="karras")  # Heun on Karras' grid (EDM): FD 16.7 vs 20.6 on logSNR at 5 steps
    c.data = dict(batch_size=arg.batch)  # no real data is read: B noises per update
    c.optim = dict(learning_rate=3e-5, warmup_steps=0, decay="constant", weight_decay=1e-4, grad_clip=1.0)
    c.train = dict(num_steps=200, log_every=4, checkpoint_every=100, keep_checkpoints=3, sharding="replicate",
                   ema_decay=0.0)
    if arg.runlocal:
        c.method.update(batch=4, steps=2)
        c.data.batch_size = 4
        c.train.update(num_steps=2, log_every=1, checkpoint_every=2)
    c.lock()
    return c
