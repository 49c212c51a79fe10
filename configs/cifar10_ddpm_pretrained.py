"""FID vs NFE of the pretrained CIFAR-10 DDPM (Ho et al. 2020; diffusers' ``google/ddpm-cifar10-32``) for every
solver, at paper scale (50k samples; meant for GPU/TPU, sharded over all devices).

    huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32     # needs network
    dpmjax convert --from-diffusers ddpm-cifar10-32 --out runs/ddpm_cifar10_32
    python experiments/fid_vs_nfe.py --workdir runs/ddpm_cifar10_32 --reference fid_stats_cifar10_train.npz
    python experiments/fid_vs_nfe.py --model random-tiny --num-samples 16 --nfe 5 --reference stats.npz  # smoke

``model`` is google/ddpm-cifar10-32's config.json as dpmjax builds it (``kind="diffusers_unet"``; the converted
folder's own config.json is what ``--workdir`` loads, this one builds the same network with random weights
for ``--model random-full``). Variant ``:tiny`` shrinks it to two levels of 16/32 channels (``--model
random-tiny``, CPU smoke runs); ``runlocal`` is the same as ``tiny`` (``configs/common.py``).
"""
from . import common

# google/ddpm-cifar10-32/config.json as diffusers >= 0.24 saves it (attention_head_dim null: one attention head, as
# in Ho et al.'s model). `dpmjax convert` reads the downloaded file itself; this copy builds the same network.
DDPM_CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    flip_sin_to_cos=False, freq_shift=1, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
    mid_block_scale_factor=1.0, act_fn="silu", norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None,
)
SOLVERS = ("ddim", "dpm_solver_2", "dpm_solver_3", "dpm_solver_2m", "dpm_solver_3m", "dpmpp_2s", "dpmpp_2m",
           "dpmpp_3m", "unipc", "plms", "s_pndm", "euler", "heun")


def get_config(arg=None):
    arg = common.parse_arg(arg, tiny=False, runlocal=False)
    c = common.base()
    c.schedule = dict(name="linear", num_train_timesteps=1000)  # scheduler_config.json: linear 1e-4..0.02
    c.model = dict(kind="diffusers_unet", timestep_scale=1.0, bfloat16=False, **DDPM_CIFAR10_UNET)
    c.data = dict(name="tfds:cifar10", image_shape=(32, 32, 3), kwargs=dict(image_key="image", label_key="label"))
    c.train.target = "eps"
    c.sample.update(solver="dpmpp_2m", nfe=10, spacing="logSNR", num=50_000)
    c.pretrained = dict(hub_id="google/ddpm-cifar10-32", workdir="runs/ddpm_cifar10_32")
    c.fid = dict(num_samples=50_000, batch_size=500, solvers=SOLVERS, nfes=(5, 6, 8, 10, 12, 15, 20),
                 spacing="logSNR", final_sigma="zero", seed=0, reference="tfds:cifar10", resize="bilinear",
                 inception_batch_size=200, out_dir="results/fid_vs_nfe")
    if arg.tiny or arg.runlocal:
        c.model.update(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
        c.fid.update(num_samples=16, batch_size=8, solvers=("ddim", "dpmpp_2m"), nfes=(5,), inception_batch_size=16,
                     out_dir="results/fid_vs_nfe_tiny")
        c.sample.num = 16
    c.lock()
    return c
