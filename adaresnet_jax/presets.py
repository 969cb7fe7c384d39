"""Named presets: each is a small set of overrides on :class:`~adaresnet_jax.config.Config`'s neutral defaults.

``python train.py --preset NAME`` starts from the preset's values; any flag given explicitly overrides
them. A flag that no preset sets keeps its neutral default (the network's or the optimiser's own
standard value). Each preset's docstring carries its command line.
"""

from __future__ import annotations

from typing import Any


def quick() -> dict[str, Any]:
    """Digits (embedded, no download), ResNet-20 at width 8, Adam 3e-3 with cosine decay, batch 64,
    15 epochs, 10% validation: about a minute on 2 CPU cores.

        python train.py --preset quick
    """
    return dict(model="resnet20", width=8, dataset="digits", optimizer="adam", lr=3e-3, schedule="cosine",
                batch_size=64, epochs=15, workdir="runs/quick")


def paper() -> dict[str, Any]:
    """The seed's experiment as its Keras code runs it: the ``paper`` network with learned skips on
    CIFAR-10, inputs scaled to [0, 1], no augmentation, Adam (lr 1e-3, Keras' epsilon 1e-7), constant
    learning rate, batch 32 with the last partial batch trained, 10 epochs, no validation split.

        python train.py --preset paper                       # CIFAR-10 is downloaded on first use
        python train.py --preset paper --skip identity --workdir runs/paper-resnet
    """
    return dict(model="paper", skip="learned", dataset="cifar10", val_split=0.0, augment=False,
                normalize=False, epochs=10, batch_size=32, optimizer="adam", lr=1e-3, adam_eps=1e-7,
                schedule="constant", drop_last=False, workdir="runs/paper")


def cifar() -> dict[str, Any]:
    """A strong CIFAR-10 recipe for ``resnet18_cifar``: SGD with Nesterov momentum 0.9, lr 0.1 at batch
    128, cosine decay after 1 warm-up epoch, weight decay 5e-4 on kernels, label smoothing 0.1, random
    crop (pad 4) and flip, per-channel normalisation, 30 epochs, 10% validation.

        python train.py --preset cifar --dtype bfloat16
    """
    return dict(model="resnet18_cifar", dataset="cifar10", augment=True, crop_pad=4, flip=True, epochs=30,
                batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, schedule="cosine",
                warmup_epochs=1.0, weight_decay=5e-4, label_smoothing=0.1, workdir="runs/cifar")


PRESETS: dict[str, dict[str, Any]] = {"quick": quick(), "paper": paper(), "cifar": cifar()}
