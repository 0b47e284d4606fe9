"""Datasets (synthetic, CIFAR in its real on-disk format, imagefolder) and the batched transforms."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from orchestrator.config import DataConfig, ModelConfig
from orchestrator.data import (LabeledImages, class_names_of, dataset_num_classes, list_datasets, load_split,
                               synthetic)
from orchestrator.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from orchestrator.data.transforms import (CIFAR10_STATS, CIFAR100_STATS, IMAGENET_STATS, BatchTransform,
                                          make_transform, resize_images)
from orchestrator.errors import ConfigError, DataError

SMALL = dict(num_classes=6, train_per_class=5, test_per_class=3)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("COMPAT_CACHE_DIR", str(path))
    return path


# ---- synthetic -----------------------------------------------------------------------------------------

def test_synthetic_shapes_dtypes_and_counts():
    cfg = DataConfig(**SMALL)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape == (30, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.images.flags.c_contiguous
    assert train.labels.dtype == np.int64 and train.sample_ids.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [5] * 6
    assert np.bincount(test.labels).tolist() == [3] * 6
    assert train.sample_ids.tolist() == list(range(30))
    assert train.mean == test.mean and train.std == test.std  # test is normalised with the train stats
    assert all(0.2 < m < 0.8 for m in train.mean) and all(0.1 < s < 0.5 for s in train.std)
    assert train.images.std() > 20  # not a blank image set


def test_synthetic_class_names_are_distinct_words_stable_across_sizes():
    names = class_names_of(DataConfig(num_classes=40))
    assert len(set(names)) == 40 and all(n.isalpha() and n.islower() for n in names)
    assert class_names_of(DataConfig(num_classes=6)) == names[:6]
    assert load_split(DataConfig(**SMALL), "train").class_names == names[:6]


def test_synthetic_is_deterministic_and_served_from_cache(tmp_path, cache_dir, monkeypatch):
    cfg = DataConfig(**SMALL)
    first = load_split(cfg, "train")
    elsewhere = load_split(cfg, "train", cache_dir=tmp_path / "other")  # generated again from scratch
    np.testing.assert_array_equal(first.images, elsewhere.images)
    assert len(list(cache_dir.iterdir())) == 1

    def no_regeneration(cfg):
        raise AssertionError("the cached arrays should have been loaded")

    monkeypatch.setattr(synthetic, "generate", no_regeneration)
    again = load_split(cfg, "train")
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    load_split(cfg, "test")  # the same entry holds both splits


@pytest.mark.parametrize("change", [{"variant": 1}, {"difficulty": 2.0}])
def test_synthetic_parameters_change_the_data(change):
    base = load_split(DataConfig(**SMALL), "train").images
    other = load_split(DataConfig(**SMALL, **change), "train").images
    assert base.shape == other.shape and not np.array_equal(base, other)


def test_synthetic_train_and_test_differ_and_image_size_is_honoured():
    cfg = DataConfig(**SMALL, image_size=24)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape[1:] == (24, 24, 3)
    assert not np.array_equal(train.images[:3], test.images[:3])


def class_mean_images(cfg: DataConfig) -> np.ndarray:
    data = load_split(cfg, "train")
    return np.stack([data.images[data.labels == c].astype(np.float64).mean(axis=0) for c in range(cfg.num_classes)])


@pytest.mark.parametrize("super_classes", [None, 4])
def test_shared_super_classes_make_the_classes_of_other_variants_relatives(super_classes):
    """With ``super_classes = K`` the class means of another variant lie nearest to the classes of the same
    super-class (c % K) and as close as siblings within one variant are; by default they are unrelated."""
    shape = dict(num_classes=12, train_per_class=30, test_per_class=1, image_size=16, super_classes=super_classes)
    upstream, other = (class_mean_images(DataConfig(**shape, variant=v)) for v in (1, 2))
    across = ((other[:, None] - upstream[None]) ** 2).sum(axis=(2, 3, 4))  # [class of variant 2, class of 1]
    same_super = np.arange(12)[:, None] % 4 == np.arange(12)[None, :] % 4
    nearest_is_relative = same_super[np.arange(12), across.argmin(axis=1)].mean()
    if super_classes is None:
        assert nearest_is_relative < 0.6  # chance is 0.25
        return
    assert nearest_is_relative == 1.0
    within = ((upstream[:, None] - upstream[None]) ** 2).sum(axis=(2, 3, 4))
    siblings = within[same_super & ~np.eye(12, dtype=bool)].mean()
    assert 0.5 < across[same_super].mean() / siblings < 2  # a relative differs as much as a sibling does
    assert across[same_super].mean() < 0.5 * across[~same_super].mean()


def test_super_classes_is_its_own_dataset_and_leaves_the_default_cache_keys_alone(cache_dir):
    base = load_split(DataConfig(**SMALL), "train").images
    assert [p.name for p in cache_dir.iterdir()] == ["synthetic-c9260023cf33acc1"]  # the key before the option
    shared = [load_split(DataConfig(**SMALL, super_classes=k), "train").images for k in (2, 3)]
    assert not np.array_equal(base, shared[0]) and not np.array_equal(shared[0], shared[1])
    assert len(list(cache_dir.iterdir())) == 3


@pytest.mark.parametrize("value, dataset, message", [(0, "synthetic", "must be >= 1"),
                                                     (10, "cifar10", "only applies to the synthetic dataset")])
def test_super_classes_errors_name_the_key(value, dataset, message):
    from orchestrator.config import load_config

    with pytest.raises(ConfigError, match=message) as err:
        load_config("quickstart", [f"data.super_classes={value}", f"data.dataset={dataset}"])
    assert err.value.key == "data.super_classes"


def test_subset_keeps_sample_ids():
    data = load_split(DataConfig(**SMALL), "test")
    part = data.subset(data.labels >= 4)
    assert part.sample_ids.tolist() == list(range(12, 18))
    assert part.labels.tolist() == [4, 4, 4, 5, 5, 5] and part.class_names == data.class_names



def test_synthetic_is_learnable_by_small_cnn():
    """A few epochs of small_cnn give leave-one-out 1-NN accuracy far above chance (0.1; measured 0.55)."""
    from methods.nets.backbones import EmbeddingNet

    torch.manual_seed(0)
    cfg = DataConfig(num_classes=10, train_per_class=60, test_per_class=20)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    net = EmbeddingNet(ModelConfig(width=16, embedding_dim=32))
    head = torch.nn.Linear(32, 10)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], 2e-3)
    transform, gen = make_transform(cfg, train, train=True), torch.Generator().manual_seed(0)
    images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    for _ in range(5):
        for batch in torch.randperm(len(labels), generator=gen).split(64):
            loss = F.cross_entropy(head(net(transform(images[batch], gen))), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        emb = F.normalize(net(make_transform(cfg, test, train=False)(torch.from_numpy(test.images))), dim=1)
    sim = emb @ emb.T
    sim.fill_diagonal_(-2)
    top1 = (test.labels[sim.argmax(1).numpy()] == test.labels).mean()
    assert top1 > 0.35


# ---- registry ------------------------------------------------------------------------------------------

def test_unknown_dataset_names_the_key_and_the_choices():
    with pytest.raises(ConfigError) as err:
        dataset_num_classes(DataConfig(dataset="mnist"))
    assert err.value.key == "data.dataset"
    assert all(name in str(err.value) for name in list_datasets())
    assert {"synthetic", "cifar10", "cifar100", "imagefolder"} <= set(list_datasets())


def test_num_classes_is_cheap():
    assert dataset_num_classes(DataConfig(num_classes=7)) == 7
    assert dataset_num_classes(DataConfig(dataset="cifar10")) == 10  # no files needed
    assert dataset_num_classes(DataConfig(dataset="cifar100")) == 100


# ---- CIFAR in its real format ----------------------------------------------------------------------------

def _rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's on-disk layout: one row per image, the R plane then G then B, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def _dump(path: Path, obj: dict) -> None:
    # The real files are Python 2 pickles whose str keys decode to str under encoding="latin1".
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _random_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _write_cifar10(root: Path, per_batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = _random_images(rng, 6 * per_batch), rng.integers(0, 10, 6 * per_batch).tolist()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        part = slice(i * per_batch, (i + 1) * per_batch)
        _dump(folder / name, {"batch_label": name, "labels": labels[part], "data": _rows(images[part]),
                              "filenames": [f"img{j}.png" for j in range(per_batch)]})
    _dump(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": CIFAR10_CLASSES,
                                    "num_vis": 3072})
    return images, np.array(labels)


def _write_cifar100(root: Path, meta_names: list[str] = CIFAR100_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    images, labels = _random_images(rng, 7), rng.integers(0, 100, 7).tolist()
    for name, part in (("train", slice(0, 4)), ("test", slice(4, 7))):
        _dump(folder / name, {"filenames": ["x.png"] * len(labels[part]), "batch_label": name,
                              "fine_labels": labels[part], "coarse_labels": [0] * len(labels[part]),
                              "data": _rows(images[part])})
    _dump(folder / "meta", {"fine_label_names": meta_names, "coarse_label_names": [f"c{i}" for i in range(20)]})
    return images, np.array(labels)


def test_cifar10_reads_the_real_format(tmp_path):
    images, labels = _write_cifar10(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    np.testing.assert_array_equal(train.images, images[:10])
    np.testing.assert_array_equal(test.images, images[10:])
    assert train.labels.tolist() == labels[:10].tolist() and train.labels.dtype == np.int64
    assert train.images.flags.c_contiguous and train.images.dtype == np.uint8
    assert train.class_names == CIFAR10_CLASSES and (train.mean, train.std) == CIFAR10_STATS
    resized = load_split(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=16), "test")
    assert resized.images.shape == (2, 16, 16, 3)


def test_cifar100_reads_the_real_format(tmp_path):
    images, labels = _write_cifar100(tmp_path)
    cfg = DataConfig(dataset="cifar100", root=str(tmp_path))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    np.testing.assert_array_equal(train.images, images[:4])
    assert test.labels.tolist() == labels[4:].tolist()
    assert len(train.class_names) == 100 and (test.mean, test.std) == CIFAR100_STATS


def test_cifar_with_foreign_meta_is_rejected(tmp_path):
    _write_cifar100(tmp_path, meta_names=[f"n{i}" for i in range(100)])
    with pytest.raises(DataError, match="other class names"):
        load_split(DataConfig(dataset="cifar100", root=str(tmp_path)), "train")


def test_missing_cifar_names_the_expected_path(tmp_path):
    with pytest.raises(DataError) as err:
        load_split(DataConfig(dataset="cifar10", root=str(tmp_path)), "train")
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "download" in str(err.value)
    with pytest.raises(DataError, match="data.root"):
        load_split(DataConfig(dataset="cifar100"), "test")


# ---- imagefolder -----------------------------------------------------------------------------------------

COLOURS = {"cat": [(255, 0, 0), (250, 10, 0)], "dog": [(0, 0, 255), (0, 20, 250), (10, 10, 240)]}


def _write_folder(root: Path) -> None:
    for split, count in (("train", None), ("test", 1)):
        for name, colours in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i, colour in enumerate(colours[:count]):
                Image.new("RGB", (20 + 7 * i, 40), colour).save(root / split / name / f"{i}.png")


def test_imagefolder_reads_resizes_and_caches(tmp_path, cache_dir):
    _write_folder(tmp_path / "folder")
    (tmp_path / "folder" / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "folder"), image_size=16)
    assert dataset_num_classes(cfg) == 2 and class_names_of(cfg) == ["cat", "dog"]
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape == (5, 16, 16, 3) and train.labels.tolist() == [0, 0, 1, 1, 1]
    assert test.labels.tolist() == [0, 1] and test.class_names == ["cat", "dog"]
    assert tuple(train.images[3, 8, 8]) == (0, 20, 250)
    assert test.mean == train.mean and train.mean[2] > train.mean[0]  # stats of the train split

    entries = set(cache_dir.iterdir())
    np.testing.assert_array_equal(load_split(cfg, "train").images, train.images)
    assert set(cache_dir.iterdir()) == entries  # served from the cache
    Image.new("RGB", (30, 30), (0, 255, 0)).save(tmp_path / "folder" / "train" / "dog" / "2.png")
    assert tuple(load_split(cfg, "train").images[4, 0, 0]) == (0, 255, 0)  # an edited file invalidates it


def test_imagefolder_errors_name_the_path(tmp_path):
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere"):
        dataset_num_classes(cfg)
    with pytest.raises(DataError, match="data.root"):
        dataset_num_classes(DataConfig(dataset="imagefolder"))
    _write_folder(tmp_path / "folder")
    (tmp_path / "folder" / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_split(DataConfig(dataset="imagefolder", root=str(tmp_path / "folder")), "train")
    (tmp_path / "folder" / "train" / "empty").rmdir()
    (tmp_path / "folder" / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="bird"):
        load_split(DataConfig(dataset="imagefolder", root=str(tmp_path / "folder")), "test")


# ---- transforms ------------------------------------------------------------------------------------------

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _batch(n: int = 32, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Reference normalisation of a (B, H, W, 3) uint8 batch."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (MEAN, STD))
    return (x.permute(0, 3, 1, 2).float() / 255 - mean) / std


def test_plain_transform_is_normalisation_for_both_layouts():
    x = _batch()
    out = BatchTransform(MEAN, STD, augment=False)(x)
    assert out.shape == (32, 3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, _plain(x))
    torch.testing.assert_close(BatchTransform(MEAN, STD, augment=False)(x.permute(0, 3, 1, 2)), out)
    with pytest.raises(ValueError, match="uint8"):
        BatchTransform(MEAN, STD, augment=False)(x.float())


def test_augmentation_is_seeded():
    x, transform = _batch(), BatchTransform(MEAN, STD, augment=True)
    a = transform(x, torch.Generator().manual_seed(7))
    b = transform(x, torch.Generator().manual_seed(7))
    c = transform(x, torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, _plain(x))


def test_flip_only_flips_about_half():
    x = _batch(64)
    out = BatchTransform(MEAN, STD, augment=True, pad=0)(x, torch.Generator().manual_seed(0))
    plain = _plain(x)
    flipped = torch.isclose(out, plain.flip(-1)).flatten(1).all(1)
    same = torch.isclose(out, plain).flatten(1).all(1)
    assert bool((flipped | same).all()) and 10 < int(flipped.sum()) < 54


def test_crop_is_a_window_of_the_zero_padded_image():
    x, pad = _batch(16), 2
    out = BatchTransform(MEAN, STD, augment=True, pad=pad)(x, torch.Generator().manual_seed(1))
    padded = F.pad(x.permute(0, 3, 1, 2), (pad, pad, pad, pad))
    moved = 0
    for i in range(len(x)):
        windows = [padded[i:i + 1, :, dy:dy + 8, dx:dx + 8] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        candidates = [_plain(w.permute(0, 2, 3, 1)) for w in windows]
        candidates += [c.flip(-1) for c in candidates]
        matches = [k for k, c in enumerate(candidates) if torch.allclose(out[i:i + 1], c)]
        assert matches, f"sample {i} is not a crop/flip of its padded image"
        moved += matches[0] % len(windows) != pad * (2 * pad + 1) + pad
    assert moved > 0


def test_resize_option_and_array_resize():
    x = _batch(4)
    assert BatchTransform(MEAN, STD, augment=True, size=20)(x, torch.Generator()).shape == (4, 3, 20, 20)
    solid = np.full((3, 32, 32, 3), 77, dtype=np.uint8)
    small = resize_images(solid, 12)
    assert small.shape == (3, 12, 12, 3) and small.dtype == np.uint8 and (small == 77).all()


@pytest.mark.parametrize("normalization, expected", [("imagenet", IMAGENET_STATS), ("cifar100", CIFAR100_STATS),
                                                     ("none", ((0.0,) * 3, (1.0,) * 3)), ("dataset", (MEAN, STD))])
def test_make_transform_picks_the_configured_stats(normalization, expected):
    x = _batch(2)
    data = LabeledImages(x.numpy(), np.zeros(2), ["a"], np.arange(2), MEAN, STD)
    transform = make_transform(DataConfig(normalization=normalization), data, train=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in expected)
    torch.testing.assert_close(transform(x), (x.permute(0, 3, 1, 2).float() / 255 - mean) / std)
    assert make_transform(DataConfig(augment=False), data, train=True).augment is False
    assert make_transform(DataConfig(), data, train=True).augment is True
