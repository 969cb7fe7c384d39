"""adaresnet-jax: AdaResNet and ResNet as pure Flax modules.

>>> import adaresnet_jax as ar
>>> model = ar.create_model("paper", num_classes=10)            # AdaResNet, the seed's network
>>> baseline = ar.create_model("paper", num_classes=10, skip="identity")
>>> fast_on_cpu = ar.create_model("paper", num_classes=10, conv_impl=ar.conv_impl_for(jax.devices()))
"""

from adaresnet_jax.conv import compute_dtype_for, conv_impl_for
from adaresnet_jax.models import (
    MODEL_NAMES,
    SKIP_RULES,
    BasicBlock,
    BottleneckBlock,
    IdentitySkip,
    LearnedSkip,
    ResNet,
    ReZeroSkip,
    WeightedSkip,
    create_model,
    skip_module,
    skip_weights,
)

__all__ = [
    "MODEL_NAMES",
    "SKIP_RULES",
    "BasicBlock",
    "BottleneckBlock",
    "IdentitySkip",
    "LearnedSkip",
    "ResNet",
    "ReZeroSkip",
    "WeightedSkip",
    "compute_dtype_for",
    "conv_impl_for",
    "create_model",
    "skip_module",
    "skip_weights",
]
__version__ = "0.1.0"
