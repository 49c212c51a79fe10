"""Distilling step-by-step on a digits teacher: a one-step student trained on N teacher (x_T, x_0) pairs, with an
auxiliary head predicting K intermediate states of the teacher's trajectory (dpmjax/methods/step_by_step.py).

    dpmjax train --config configs/digits.py --workdir runs/digits                              # the teacher
    dpmjax finetune --method step_by_step --teacher runs/digits --workdir runs/digits_sbs
    dpmjax finetune --method step_by_step --teacher runs/digits --workdir runs/digits_sbs_noaux \
        --config configs/methods/step_by_step.py:aux=false
    dpmjax sample --workdir runs/digits_sbs                                          # renoise, 1 NFE: x0(x_T, 1)
    dpmjax eval --workdir runs/digits_sbs --solvers renoise --nfe 1

Variants: ``pairs=N`` (distillation pairs: the first N of the pool, see ``method.pair_seed``), ``aux=false``
(the ablation: no head, alpha = 1), ``states=K`` (rationale states), ``rationale=denoised`` (the teacher's
x0-predictions at those states instead of the noisy states), ``alpha=A``, ``steps=k`` (student NFE),
``runlocal`` (a few updates on 64 pairs at batch 8: a smoke test).
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, pairs=2000, aux=True, states=3, alpha=0.5, steps=1, rationale="states", runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    # the teacher's own sampler (configs/digits.py: dpmpp_2m, 10 NFE, Karras grid) makes the pairs; K states of
    # its 10-call trajectory (entries 1, 4, 6 for K = 3) are the rationale
    c.method = dict(name="step_by_step", num_pairs=arg.pairs, pair_seed=0, teacher_solver="dpmpp_2m",
                    teacher_nfe=10, spacing="karras", student_steps=arg.steps, student_spacing="time_uniform",
                    rationale_states=arg.states, rationale=arg.rationale, alpha=arg.alpha, aux=arg.aux,
                    generate_batch=250)
    c.data = dict(batch_size=64)  # pairs per update (drawn with replacement)
    c.optim = dict(learning_rate=1e-3, warmup_steps=50, decay="cosine", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=1500, log_every=50, checkpoint_every=500, keep_checkpoints=3, sharding="replicate",
                   ema_decay=0.995)
    if arg.runlocal:
        c.method.update(num_pairs=64, generate_batch=32)
        c.data.batch_size = 8
        c.optim.warmup_steps = 0
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2, ema_decay=0.0)
    c.lock()
    return c
