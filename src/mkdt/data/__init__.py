"""Labelled image datasets as uint8 tensors: on-disk format loaders and a decode-once cache.

`load_dataset` finds a dataset's files, decodes them once into uint8 tensors, caches those in a
safetensors file and returns an `ImageData`. Every problem with the user's data (missing,
incomplete or corrupt files, an unknown name) raises `DataError` with a one-line message saying
what was expected and how to fix it.

Modules: `types` (ImageData, Splits, DatasetSpec), `decode` (helpers shared by the formats, and
the 8-bit rule for every image mode), `walk` (the one walk of a dataset folder, which follows links
only out of it), `memory` (the memory estimate before decoding or resizing allocates), `cache`
(the decode-once cache and default folders), `registry` (DATASETS and load_dataset) and
`formats` (one module per on-disk format: imagefolder, digits, cifar, tinyimagenet,
fashion_mnist, aircraft, cub, dogs, flowers; `listed` holds the helpers of the last four).
"""

from mkdt.data.cache import default_cache_dir
from mkdt.data.registry import DATASETS, dataset_names, load_dataset
from mkdt.data.types import DatasetSpec, ImageData, Splits

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "ImageData",
    "Splits",
    "dataset_names",
    "default_cache_dir",
    "load_dataset",
]
