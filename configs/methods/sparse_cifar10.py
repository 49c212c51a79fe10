"""Sparse finetuning with SquareHead on the converted google/ddpm-cifar10-32 UNet (dpmjax/methods/sparse.py; a GPU
/ TPU run).

    dpmjax convert --from-diffusers /path/to/ddpm-cifar10-32 --out runs/ddpm_cifar10               # the teacher
    dpmjax finetune --method sparse --teacher runs/ddpm_cifar10 --workdir runs/cifar10_sparse75 \\
        --config configs/methods/sparse_cifar10.py:sparsity=0.75
    dpmjax sample --workdir runs/cifar10_sparse75

The converted teacher records no dataset: CIFAR-10 through TFDS (a prepared data_dir, or network). SquareHead's
recipe transplanted to the DDPM setting: finetuning at the pretraining learning rate scale (Adam 2e-4, the DDPM
paper's), batch 128, 20k updates, the cubic ramp over the first 15k (pruning every 100 updates) then 5k recovery
updates at s_f, loss = eps-MSE + output MSE + SquareHead over the 22 ResnetBlock2D outputs (weights 1),
EMA 0.9999 (masked like the weights). Variants: ``sparsity=S`` (0.75), ``distill=none|output|squarehead``,
``steps=N`` (20000).
"""
import ml_collections

from dpmjax.config import parse_arg

DISTILL = {"none": (0.0, 0.0), "output": (1.0, 0.0), "squarehead": (1.0, 1.0)}


def get_config(arg=None):
    arg = parse_arg(arg, sparsity=0.75, distill="squarehead", steps=20000)
    if arg.distill not in DISTILL:
        raise ValueError(f"variant distill={arg.distill!r}: choose one of {sorted(DISTILL)}")
    output_weight, squarehead_weight = DISTILL[arg.distill]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="sparse", sparsity=arg.sparsity, initial_sparsity=0.0, prune_start=0,
                    prune_end=int(0.75 * arg.steps), prune_every=100, scope="per_tensor",
                    output_weight=output_weight, squarehead_weight=squarehead_weight)
    c.data = dict(name="tfds:cifar10", image_shape=(32, 32, 3), kwargs=dict(image_key="image", label_key="label"),
                  batch_size=128, random_flip=True)
    c.optim = dict(learning_rate=2e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=arg.steps, log_every=100, checkpoint_every=2000, keep_checkpoints=3, sharding="fsdp",
                   ema_decay=0.9999)
    c.lock()
    return c
