"""CIFAR-10 and CIFAR-100 from their official python-format directories, read through torchvision.

torch and torchvision are imported when a CIFAR split is loaded, not when the dataset registry is:
processes that only decode image files (Ray Data's decoding tasks) start without them.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.data import DatasetSource, LabeledImages, Split, register_dataset
from orchestrator.errors import DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]


@functools.cache
def _reader(name: str):
    """torchvision's class ``name`` (CIFAR10 or CIFAR100), see :func:`_files_checked_by_existence`."""
    from torchvision import datasets

    return _files_checked_by_existence(getattr(datasets, name))


def _files_checked_by_existence(cls):
    """torchvision's class with per-file MD5 checks dropped (the downloaded archive is still verified),
    so re-packed or subset directories in the official format load too, without hashing 170 MB per load."""
    return type(cls.__name__, (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


@register_dataset("cifar10")
class Cifar10(DatasetSource):
    torchvision_name = "CIFAR10"
    names = CIFAR10_CLASSES
    stats_name = "CIFAR10_STATS"  # in orchestrator/data/transforms.py

    @property
    def reader(self):
        return _reader(self.torchvision_name)

    def class_names(self, cfg: DataConfig) -> list[str]:
        return list(self.names)

    def load(self, cfg: DataConfig, split: Split, cache_dir: Path) -> LabeledImages:
        if cfg.root is None:
            raise DataError(f"dataset {cfg.dataset!r} needs data.root: the directory that holds "
                            f"{self.reader.base_folder}/")
        expected = Path(cfg.root).expanduser() / self.reader.base_folder
        try:
            ds = self.reader(str(Path(cfg.root).expanduser()), train=split == "train", download=cfg.download)
        except RuntimeError:
            raise DataError(f"{cfg.dataset} not found at {expected}; place the extracted archive "
                            f"({self.reader.filename}) there, or set data.download: true on a machine with "
                            f"network access") from None
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
            if cfg.download and not (expected / self.reader.meta["filename"]).is_file():
                raise DataError(f"downloading {cfg.dataset} into {expected.parent} failed: {exc}") from None
            raise DataError(f"{cfg.dataset} at {expected} is unreadable or malformed: {exc}") from None
        if list(ds.classes) != self.names:
            raise DataError(f"{expected} does not hold {cfg.dataset}: its meta file lists other class names")
        from orchestrator.data import transforms

        images = transforms.resize_images(np.ascontiguousarray(ds.data), cfg.image_size)
        labels = np.asarray(ds.targets, dtype=np.int64)
        return LabeledImages(images, labels, self.class_names(cfg), np.arange(len(labels), dtype=np.int64),
                             *getattr(transforms, self.stats_name))


@register_dataset("cifar100")
class Cifar100(Cifar10):
    torchvision_name = "CIFAR100"
    names = CIFAR100_CLASSES
    stats_name = "CIFAR100_STATS"
