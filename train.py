"""Train ResNet / AdaResNet: `python train.py --preset quick` (see `python train.py --help`).

Presets: quick (digits, ~1 min on CPU), paper (the seed's experiment, CIFAR-10), cifar (a strong
resnet18_cifar recipe). All logic lives in adaresnet_jax.train; this file only runs its main().
"""

import sys

from adaresnet_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
