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


def imagenet() -> dict[str, Any]:
    """ResNet-50 on ImageNet (ILSVRC-2012, 1.28 M training images, 1000 classes), streamed from the host: the
    recipe of Goyal et al. 2017 ("Accurate, Large Minibatch SGD") and torchvision's reference: SGD with
    Nesterov momentum 0.9, lr 0.1 x batch/256 (0.4 at batch 1024), 5 warm-up epochs then cosine to 0, 90
    epochs, weight decay 1e-4 on conv/dense kernels only, label smoothing 0.1, Inception-style crop to 224
    px + flip, evaluation at 224 after resizing to 256. ``dtype auto``: bfloat16 on GPU/TPU, float32 on CPU.
    1% of the training set is held out for model selection (big_vision's "minival"); the reported test
    accuracy is ImageNet's validation set. Expected top-1 with ``--skip identity`` (plain ResNet-50):
    76-77% (Goyal et al. 2017: 23.74% top-1 error at 90 epochs, batch 256 to 8k; torchvision's ResNet-50 V1
    weights: 76.13%; flax's ImageNet example: 76.72%, 100 epochs on 8 V100s); not yet measured with this
    code. The default ``--skip learned`` trains AdaResNet-50.

        python train.py --preset imagenet --skip identity --data-dir /data/imagenet     # train/<class>/*.JPEG + val/
        python train.py --preset imagenet --data-dir ~/tensorflow_datasets             # TFDS imagenet2012, ArrayRecord
    """
    return dict(model="resnet50", dataset="imagenet2012", input="streaming", image_size=224, augment=True,
                flip=True, val_split=0.01, epochs=90, batch_size=1024, optimizer="sgd", lr=0.1, lr_batch=256,
                momentum=0.9, nesterov=True, schedule="cosine", warmup_epochs=5.0, weight_decay=1e-4,
                label_smoothing=0.1, dtype="auto", eval_batch_size=1024, log_every_steps=100,
                checkpoint_every_minutes=30.0, workdir="runs/imagenet")


def imagenette() -> dict[str, Any]:
    """The imagenet recipe on Imagenette (10 easy ImageNet classes, 9,469 training images; fast.ai's) at
    128 px for 20 epochs (2 of warm-up), batch 256: minutes on one GPU. From TFDS (``imagenette``, prepared
    as ArrayRecord) or an image folder (``--data-dir imagenette2-160`` with train/ and val/). Accuracy not
    yet measured with this code.

        python train.py --preset imagenette --data-dir ~/tensorflow_datasets
        python train.py --preset imagenette --data-dir /data/imagenette2-160 --skip identity
    """
    return {**imagenet(), **dict(dataset="imagenette", image_size=128, val_split=0.05, epochs=20, batch_size=256,
                                 warmup_epochs=2.0, eval_batch_size=512, log_every_steps=None,
                                 checkpoint_every_minutes=None, workdir="runs/imagenette")}


PRESETS: dict[str, dict[str, Any]] = {"quick": quick(), "paper": paper(), "cifar": cifar(), "imagenet": imagenet(),
                                      "imagenette": imagenette()}
