"""Sparse finetuning of the digits teacher with SquareHead distillation (dpmjax/methods/sparse.py).

    dpmjax train --config configs/digits.py --workdir runs/digits                                  # the teacher
    dpmjax finetune --method sparse --teacher runs/digits --workdir runs/digits_sparse90_sh \
        --config configs/methods/sparse.py:sparsity=0.9,distill=squarehead
    dpmjax finetune --method sparse --teacher runs/digits --workdir runs/digits_sparse50 \
        --config configs/methods/sparse.py:sparsity=0.5,distill=none               # eps-loss only
    dpmjax sample --workdir runs/digits_sparse90_sh
    python experiments/sparse.py                                                      # the comparison table

The student is trained on the teacher's own dataset (``data.name`` unset). Variants: ``sparsity=S`` (the final
sparsity s_f of the Dense / Conv kernels: 0.5, 0.75, 0.9; any value in [0, 1)), ``distill=none|output|squarehead``
(eps-loss only; + output MSE to the dense teacher; + output MSE + SquareHead's per-block normalised feature MSE,
each weight 1 as the official recipe's hardness values), ``steps=N`` (updates, 600: the cubic ramp over the first
75 %, pruning every 10 updates, then recovery at s_f), ``runlocal`` (8 updates: a smoke test).
Adam 5e-4 with cosine decay (the recovery updates run at small rates), batch 64, no EMA.
"""
import ml_collections

from dpmjax.config import parse_arg

DISTILL = {"none": (0.0, 0.0), "output": (1.0, 0.0), "squarehead": (1.0, 1.0)}


def get_config(arg=None):
    arg = parse_arg(arg, sparsity=0.5, distill="squarehead", steps=600, runlocal=False)
    if arg.distill not in DISTILL:
        raise ValueError(f"variant distill={arg.distill!r}: choose one of {sorted(DISTILL)}")
    output_weight, squarehead_weight = DISTILL[arg.distill]
    steps = 8 if arg.runlocal else arg.steps
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="sparse", sparsity=arg.sparsity, initial_sparsity=0.0, prune_start=0,
                    prune_end=int(0.75 * steps), prune_every=2 if arg.runlocal else 10, scope="per_tensor",
                    output_weight=output_weight, squarehead_weight=squarehead_weight)
    c.data = dict(batch_size=8 if arg.runlocal else 64)
    c.optim = dict(learning_rate=5e-4, warmup_steps=0, decay="cosine", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=steps, log_every=4 if arg.runlocal else 50, checkpoint_every=4 if arg.runlocal else 200,
                   keep_checkpoints=2, sharding="replicate", ema_decay=0.0)
    c.lock()
    return c
