"""Train a CIFAR ResNet with the recipe of He et al. (2015), section 4.2.

The paper: 45k/5k train/validation split, 4-pixel padding + random 32x32 crop +
horizontal flip, per-channel normalization, He initialization, SGD with momentum 0.9,
weight decay 1e-4, batch 128, learning rate 0.1 divided by 10 at 32k and 48k iterations
and stopped at 64k (about 182 epochs). ``--schedule step`` reproduces that, scaled to
``--epochs``. The default ``onecycle`` (linear warm-up, cosine decay; Smith & Topin 2017)
gets most of the way in a fraction of the epochs, which is what two CPU cores can afford;
``--init`` runs another cycle from an earlier run's weights (a warm restart, as in SGDR,
Loshchilov & Hutter 2017) when there is time for more. ``--teacher`` distils one or
more trained models into the one being trained (Hinton et al. 2015): a deeper CIFAR
ResNet, or an ensemble of earlier runs, into the small one you serve.

Example::

    python -m export.train --arch cifar-resnet20 \\
        --data ../shared/datasets/cifar10-train.tar.gz --epochs 40 --out runs/r20
    python -m export.train --arch cifar-resnet20 --init runs/r20/best.pt --lr 0.1 \\
        --data ../shared/datasets/cifar10-train.tar.gz --epochs 40 --out runs/r20-more

It runs on a CUDA GPU when there is one (``--device auto``, the default) and on the CPU
otherwise. ``--amp bf16`` trains in bfloat16 mixed precision (autocast; weights and the
optimizer stay float32): on Ampere and later GPUs, and on CPUs with AVX-512 BF16 or AMX,
which run it faster. ``--amp fp16`` is for older GPUs, with dynamic loss scaling.

Writes ``last.pt`` (every epoch, for ``--resume``), ``best.pt`` (best validation
accuracy), ``metrics.csv`` and ``curve.png`` to ``--out``. Both checkpoints are plain
tensors and primitives, loadable with ``torch.load(..., weights_only=True)`` and accepted
directly by ``python -m export``.
"""

# By job: cli (the flags, their checks, the exit status), checkpoint (the file every reader
# shares), augment (crops, flips, Cutout), distill (the teachers), loop (the epochs, with
# --init and --resume), reports (metrics.csv and curve.png). The data set and its held-out
# split come from export.data, the architectures from export.cifar_resnet.
