"""MMD-DDM at paper scale: CIFAR-10 with the converted google/ddpm-cifar10-32 teacher (needs a GPU / TPU).

    dpmjax convert --from-diffusers /path/to/ddpm-cifar10-32 --out runs/ddpm_cifar10       # the teacher
    dpmjax finetune --method mmd_ddm --teacher runs/ddpm_cifar10 --workdir runs/cifar10_mmd10 \
        --config configs/methods/mmd_ddm_cifar10.py:steps=10
    python experiments/fid_vs_nfe.py --workdir runs/cifar10_mmd10 --solvers ddim --nfe 10           # FID

The official recipe (diegovalsesia/MMD-DDM, configs/cifar10.yml and runners/diffusion.py): DDIM with eta 0,
Inception-v3 pool3 features (2048-d), the unbiased MMD^2 with the cubic polynomial kernel on raw features,
batch 64 real + 64 generated, Adam lr 5e-6 (eps 1e-8), gradient-norm clip 0.5 (the code's value; its config
says 1.0), the whole UNet finetuned, no EMA. ``remat`` (per-step ``jax.checkpoint``; the official
``generalized_steps_gp``) keeps the memory of backprop through T' UNet calls at one step's activations.
Scoring FID in the Inception space the finetuning optimised games the metric (the paper's caveat): report
also a metric in another feature space (e.g. KID in CLIP features, or the ``features=`` of another network).
Variants: ``steps=N`` (T'; the paper reports 5 and 10 among others).
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    steps = parse_arg(arg, steps=10).steps
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="mmd_ddm", steps=steps, solver="ddim", spacing="leading", solver_options={},
                    features="inception", kernel="polynomial", kernel_options={}, remat=True,
                    normalize_features=False)
    # the converted teacher records no dataset: CIFAR-10 through TFDS (prepared data_dir, or network)
    c.data = dict(name="tfds:cifar10", image_shape=(32, 32, 3), kwargs=dict(image_key="image", label_key="label"),
                  batch_size=64, random_flip=False)
    c.optim = dict(learning_rate=5e-6, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=0.5, b1=0.9,
                   b2=0.999)
    c.train = dict(num_steps=5000, log_every=50, checkpoint_every=500, keep_checkpoints=3, sharding="fsdp",
                   ema_decay=0.0)
    c.lock()
    return c
