"""Image-classification data: host-side sources (:mod:`.sources`) and on-device transforms (:mod:`.transforms`).

``load_dataset(name, data_dir)`` gives a :class:`Dataset` of uint8 NHWC numpy arrays; ``normalize`` and
``augment`` are pure jax functions that run inside the compiled step. ``fetch(name)`` downloads a CIFAR
python archive into :func:`cache_dir` (:mod:`.download`; also ``python -m adaresnet_jax.data download cifar10``).
"""

from adaresnet_jax.data.download import DownloadError, cache_dir, fetch
from adaresnet_jax.data.errors import DataError
from adaresnet_jax.data.sources import Dataset, Split, channel_stats, from_arrays, load_dataset, validate
from adaresnet_jax.data.transforms import augment, normalize

__all__ = ["DataError", "Dataset", "channel_stats", "DownloadError", "augment", "cache_dir", "fetch", "from_arrays", "load_dataset",
           "normalize", "Split", "validate"]
