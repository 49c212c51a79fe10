"""QST, LoRA and full finetuning at accelerator scale on the converted google/ddpm-cifar10-32 UNet, one budget.

    dpmjax convert --from-diffusers /path/to/ddpm-cifar10-32 --out runs/ddpm_cifar10          # the source
    dpmjax finetune --method qst --teacher runs/ddpm_cifar10 --workdir runs/cifar10_qst \\
        --config configs/methods/qst_cifar10.py:target=folder:/path/to/10_target_images
    dpmjax finetune --method lora --teacher runs/ddpm_cifar10 --workdir runs/cifar10_lora \\
        --config configs/methods/qst_cifar10.py:lora
    dpmjax finetune --method full_finetune --teacher runs/ddpm_cifar10 --workdir runs/cifar10_ft \\
        --config configs/methods/qst_cifar10.py:baseline

The 35.7M-parameter UNet (blocks of 128 / 256 channels) adapted on 10 shots of CIFAR-10 in the ``invert`` style
domain (``dpmjax.data.few_shot``; TFDS must have cifar10 prepared; ``target=folder:DIR`` for your own 32x32 RGB
images), batch = the 10 shots, 2000 updates, EMA 0.999, fsdp. QST: NF4 + double quantisation of every conv and
dense kernel, side widths d / 16 (QST's LLaMA reduction), the 16-wide downsamplers. LoRA (``lora``): rank 8,
alpha 8, on the resnets' convolutions and the attention projections. Full finetuning (``baseline``): DomainStudio's
Adam 1e-4. The adapters and the side network take a 10x larger step (1e-3; peft's DreamBooth LoRA recipe uses
~20x the full-finetuning rate); none of these rates is from the QST paper, which tunes LLMs.
"""
from dpmjax.methods.adaptation import adaptation_config


def get_config(arg=None):
    c, arg = adaptation_config("qst", arg, target="style:tfds:cifar10:invert", steps=2000, lora=False,
                               baseline=False)
    c.data.update(image_shape=(32, 32, 3), batch_size=min(10, arg.shots))
    if "kwargs" in c.data:  # a folder target: 32x32 RGB
        c.data.kwargs = dict(channels=3, image_size=32)
    c.optim.update(learning_rate=1e-3, grad_clip=1.0)
    c.train.update(log_every=50, checkpoint_every=500, sharding="fsdp", ema_decay=0.999)
    if arg.lora and arg.baseline:
        raise ValueError("choose one of the variants lora and baseline")
    if arg.lora:
        c.method = dict(name="lora", rank=8, alpha=None, targets=("blocks",))
    elif arg.baseline:
        c.method = dict(name="full_finetune")
        c.optim.learning_rate = 1e-4
    else:
        c.method.update(reduction=16, adapter_dim=16, gate_init=0.5, quantize=("kernels",), double_quant=True)
    c.lock()
    return c
