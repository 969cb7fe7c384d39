"""Image-classification data: host-side sources (:mod:`.sources`) and on-device transforms (:mod:`.transforms`).

``load_dataset(name, data_dir)`` gives a :class:`Dataset` of uint8 NHWC numpy arrays; ``normalize`` and
``augment`` are pure jax functions that run inside the compiled step.
"""

from adaresnet_jax.data.sources import DataError, Dataset, from_arrays, load_dataset, validate
from adaresnet_jax.data.transforms import augment, normalize

__all__ = ["DataError", "Dataset", "augment", "from_arrays", "load_dataset", "normalize", "validate"]
