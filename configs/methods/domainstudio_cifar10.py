"""DomainStudio at accelerator scale on the converted google/ddpm-cifar10-32 UNet (dpmjax/methods/domainstudio.py).

    dpmjax convert --from-diffusers /path/to/ddpm-cifar10-32 --out runs/ddpm_cifar10          # the source
    dpmjax finetune --method domainstudio --teacher runs/ddpm_cifar10 --workdir runs/cifar10_ds \\
        --config configs/methods/domainstudio_cifar10.py:target=folder:/path/to/10_target_images
    dpmjax finetune --method full_finetune --teacher runs/ddpm_cifar10 --workdir runs/cifar10_ft \\
        --config configs/methods/domainstudio_cifar10.py:baseline              # plain finetuning, same budget

The paper's unconditional recipe: the official flags --pair_weight 4 --hf_pair_weight 4 --hf_mse_weight 1,
Adam lr 1e-4, 10 shots; its batch of 3 per GPU on 8 GPUs exceeds the 10 shots, so here a batch is all 10 shots
(``sim_size`` 0: relative distances over the whole batch). The default target is CIFAR-10 in the ``invert``
style domain (``dpmjax.data.few_shot``; TFDS must have cifar10 prepared); give ``target=folder:DIR`` for your
own 32x32 RGB images. The number of updates is not in the paper; 2000 is a few hundred epochs of the shots.
"""
from dpmjax.methods.adaptation import adaptation_config


def get_config(arg=None):
    c, arg = adaptation_config("domainstudio", arg, target="style:tfds:cifar10:invert", steps=2000, baseline=False)
    c.data.update(image_shape=(32, 32, 3), batch_size=min(10, arg.shots))
    if "kwargs" in c.data:  # a folder target: 32x32 RGB
        c.data.kwargs = dict(channels=3, image_size=32)
    c.optim.update(learning_rate=1e-4, grad_clip=1.0)
    c.train.update(log_every=50, checkpoint_every=500,
                   sharding="fsdp", ema_decay=0.999)
    if arg.baseline:
        c.method = dict(name="full_finetune")
    else:
        c.method.update(pair_weight=4.0, hf_pair_weight=4.0, hf_mse_weight=1.0, sim_size=0)
    c.lock()
    return c
