"""File-backed datasets (image folders, Parquet, WebDataset shards, Hugging Face save_to_disk directories)
in memory and streamed by Ray Data: the same pixels, the same batches, the same run; bad files named
before or when they are read."""

from __future__ import annotations

import json
import os
import re
import tarfile

import numpy as np
import pytest
import ray

from orchestrator import load_config, run_experiment
from orchestrator.config import DataConfig
from orchestrator.data import load_split
from orchestrator.data.encoded import check_splits, split_index
from orchestrator.data.export import WRITERS, write_imagefolder
from orchestrator.data.formats import read_images
from orchestrator.data.streaming import BLOCK_BYTES, StreamedImages, block_rows, open_split, streams
from orchestrator.errors import ConfigError, DataError
from orchestrator.storage.runfiles import manifest_entry

CLASSES = ["ant", "bee", "cat", "dog"]
KINDS = [*WRITERS, "huggingface"]


def _images(rng, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-grouped random images of uneven sizes (so decoding resizes and crops)."""
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    return rng.integers(0, 256, (len(labels), 14, 11, 3), dtype=np.uint8), labels


def save_to_disk(root, splits: dict, class_names: list[str], num_shards: dict, image: str = "image",
                 label: str = "label") -> None:
    """``{split: (images, labels)}`` as the ``datasets`` library itself saves a DatasetDict: PNG images in
    an ``Image`` feature, labels in a ``ClassLabel``."""
    import datasets
    from PIL import Image

    features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=class_names)})
    datasets.DatasetDict({
        split: datasets.Dataset.from_dict({image: [Image.fromarray(im) for im in images], label: labels.tolist()},
                                          features=features)
        for split, (images, labels) in splits.items()}).save_to_disk(str(root), num_shards=num_shards)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The same small dataset in every format: ``{kind: root}``. Sample order is class then index in
    every format, so sample ids agree across formats."""
    base = tmp_path_factory.mktemp("formats")
    rng = np.random.default_rng(0)
    splits = {"train": _images(rng, 8), "test": _images(rng, 3)}
    options = {"parquet": {"row_group_size": 5}, "webdataset": {"samples_per_shard": 7}, "imagefolder": {}}
    for kind, write in WRITERS.items():
        for split, (images, labels) in splits.items():
            write(base / kind, split, images, labels, CLASSES, **options[kind])
    save_to_disk(base / "huggingface", splits, CLASSES, num_shards={"train": 3, "test": 1})
    return {kind: str(base / kind) for kind in KINDS}


def _cfg(roots, kind: str, loading: str = "memory") -> DataConfig:
    return DataConfig(dataset=kind, root=roots[kind], image_size=8, loading=loading)


# ---- no Ray --------------------------------------------------------------------------------------------

def test_every_format_decodes_the_same_pixels(roots):
    reference = {split: load_split(_cfg(roots, "imagefolder"), split) for split in ("train", "test")}
    for kind in KINDS:
        for split, ref in reference.items():
            data = load_split(_cfg(roots, kind), split)
            assert data.class_names == CLASSES and data.labels.tolist() == ref.labels.tolist()
            np.testing.assert_array_equal(data.images, ref.images)
            assert (data.mean, data.std) == (ref.mean, ref.std)  # the train split's, for both splits
            index = split_index(_cfg(roots, kind), split)
            picked = np.array([5, 0, len(index) - 1, 5])  # random access, repeats included
            np.testing.assert_array_equal(read_images(index.source, index.rows(picked)), ref.images[picked])


def test_parquet_as_hugging_face_stores_it(tmp_path):
    """An image struct {bytes, path} and integer labels (a Hugging Face ``datasets`` image column as
    written to Parquet): classes "0".."3" in numeric order, the same pixels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data.export import png_bytes

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    images, labels = _images(np.random.default_rng(5), 2)
    column = [{"bytes": png_bytes(im), "path": f"{i}.png"} for i, im in enumerate(images)]
    for split in ("train", "test"):
        pq.write_table(pa.table({"image": column, "label": pa.array(labels.tolist(), pa.int64())}),
                       tmp_path / split / "data.parquet")
    cfg = DataConfig(dataset="parquet", root=str(tmp_path), image_size=8)
    data = load_split(cfg, "test")
    assert data.class_names == ["0", "1", "2", "3"] and data.labels.tolist() == labels.tolist()
    write_imagefolder(tmp_path / "folder", "train", images, labels, CLASSES)
    write_imagefolder(tmp_path / "folder", "test", images, labels, CLASSES)
    folder = load_split(DataConfig(dataset="imagefolder", root=str(tmp_path / "folder"), image_size=8), "test")
    np.testing.assert_array_equal(data.images, folder.images)


def test_hugging_face_save_to_disk_read_with_pyarrow(tmp_path):
    """A DatasetDict saved by ``datasets`` itself, read without it: its ClassLabel's names in their own
    (not alphabetical) order, the image and label columns found by name, random access across files and
    record batches (``datasets`` writes 100 image rows per batch), the held-out split mapped from
    ``validation``; a truncated or unlabelled file fails validation, naming the file."""
    import shutil

    from orchestrator.data import class_names_of

    rng = np.random.default_rng(6)
    names = ["zebra", "ant", "moth"]
    train = rng.integers(0, 256, (210, 8, 8, 3), dtype=np.uint8), np.arange(210) % 3  # 8 px: decoding is exact
    held_out = train[0][:7], np.array([2, 2, 0, 1, 0, 2, 1])
    save_to_disk(tmp_path / "hf", {"train": train, "validation": held_out}, names,
                 num_shards={"train": 2, "validation": 1}, image="img", label="fine_label")
    cfg = DataConfig(dataset="huggingface", root=str(tmp_path / "hf"), image_size=8, splits={"test": "validation"})
    check_splits(cfg)
    assert class_names_of(cfg) == names  # text-based methods get the names
    index = split_index(cfg, "train")
    batches = np.unique(np.stack([index.locators["file"], index.locators["offset"]]), axis=1)
    assert index.labels.tolist() == train[1].tolist() and batches.shape[1] == 4  # 105 rows a file: 100 + 5
    picked = np.array([150, 3, 209, 104, 105, 3])  # both files, all four record batches, a repeat
    np.testing.assert_array_equal(read_images(index.source, index.rows(picked)), train[0][picked])
    test = load_split(cfg, "test")
    assert test.labels.tolist() == held_out[1].tolist() and test.class_names == names
    np.testing.assert_array_equal(test.images, held_out[0])
    assert streams(DataConfig(dataset="huggingface", root=cfg.root, splits=cfg.splits, memory_limit_gb=1e-9))

    for cut, at in (("mid-batch", 3000), ("end-of-stream marker", -8)):
        damaged = tmp_path / f"damaged-{at}"
        shutil.copytree(tmp_path / "hf", damaged)
        arrow = damaged / "train" / "data-00001-of-00002.arrow"
        arrow.write_bytes(arrow.read_bytes()[:at])
        with pytest.raises(DataError, match="data-00001-of-00002.arrow"):
            check_splits(DataConfig(dataset="huggingface", root=str(damaged), splits={"test": "validation"}))
        # bad_images: skip keeps the record batches before the damage (a lost end marker loses none)
        kept = split_index(DataConfig(dataset="huggingface", root=str(damaged), splits={"test": "validation"},
                                      bad_images="skip"), "train")
        assert len(kept) == (105 if cut == "mid-batch" else 210) and kept.skipped == []
        assert len(kept.damaged_files) == 1 and "data-00001-of-00002.arrow" in kept.damaged_files[0]
    save_to_disk(tmp_path / "unlabelled", {"train": train, "test": (held_out[0][:2], np.array([-1, -1]))}, names,
                 num_shards={"train": 1, "test": 1})
    with pytest.raises(DataError, match=r"test/data-00000-of-00001.arrow: label -1 .*data.splits"):
        check_splits(DataConfig(dataset="huggingface", root=str(tmp_path / "unlabelled")))
    with pytest.raises(ConfigError, match="data.splits.*'val'"):
        load_config(None, ["data.dataset=huggingface", "data.splits={val: validation}"])
    with pytest.raises(ConfigError, match="data.splits.*file-backed"):
        load_config(None, ["data.splits={test: validation}"])


def test_loading_modes_and_their_config_errors(roots):
    assert not streams(DataConfig())  # synthetic data is always in memory
    assert not streams(_cfg(roots, "parquet", "auto"))  # small: under the default limit
    assert streams(DataConfig(dataset="parquet", root=roots["parquet"], memory_limit_gb=1e-9))
    assert streams(_cfg(roots, "webdataset", "stream")) and not streams(_cfg(roots, "webdataset", "memory"))
    with pytest.raises(ConfigError, match="data.loading.*file-backed"):
        load_config(None, ["data.loading=stream"])
    with pytest.raises(ConfigError, match="data.loading.*allowed values"):
        load_config(None, ["data.loading=lazy"])
    with pytest.raises(ConfigError, match="data.memory_limit_gb"):
        load_config(None, ["data.memory_limit_gb=0"])


def test_bad_files_are_named(roots, tmp_path):
    rng = np.random.default_rng(1)
    images, labels = _images(rng, 2)
    # an undecodable image, in memory: the error names the file
    write_imagefolder(tmp_path / "folder", "train", images, labels, CLASSES)
    (tmp_path / "folder" / "train" / "bee" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot decode image .*bee/2\.png"):
        load_split(DataConfig(dataset="imagefolder", root=str(tmp_path / "folder")), "train")
    # a truncated shard: named while indexing, before any training
    WRITERS["webdataset"](tmp_path / "wds", "train", images, labels, CLASSES, samples_per_shard=4)
    shard = tmp_path / "wds" / "train" / "shard-00001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(DataError, match="shard-00001.tar"):
        split_index(DataConfig(dataset="webdataset", root=str(tmp_path / "wds")), "train")
    # a sample without its label
    with tarfile.open(tmp_path / "wds" / "train" / "shard-00001.tar", "w") as tar:
        tar.add(str(tmp_path / "folder" / "train" / "ant" / "0.png"), arcname="x9.png")
    with pytest.raises(DataError, match=r"'x9' has no label"):
        split_index(DataConfig(dataset="webdataset", root=str(tmp_path / "wds")), "train")
    # a Parquet file without the expected columns
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"img": [b"x"], "label": [1]}), tmp_path / "pq" / "train" / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet needs columns 'image' and 'label'"):
        split_index(DataConfig(dataset="parquet", root=str(tmp_path / "pq")), "train")


def test_splits_with_different_classes_fail_before_work(roots, tmp_path):
    rng = np.random.default_rng(2)
    images, labels = _images(rng, 2)
    WRITERS["parquet"](tmp_path, "train", images, labels, CLASSES)
    WRITERS["parquet"](tmp_path, "test", images, labels, ["ant", "bee", "cat", "eel"])
    with pytest.raises(DataError, match="label 'eel' is not one of the train split's 4 classes"):
        check_splits(DataConfig(dataset="parquet", root=str(tmp_path)))
    with pytest.raises(DataError, match="eel"):
        load_config(None, ["data.dataset=parquet", f"data.root={tmp_path}", "scenario.initial_classes=2",
                           "scenario.increment=1"])


# ---- data.bad_images: skip ---------------------------------------------------------------------------

NOT_AN_IMAGE = "not an image format PIL can read"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The same small dataset in every format with bad samples in its train split: ``{kind: (root, kept
    sample ids, expected skipped errors, expected damaged-file errors)}``. Test splits are clean."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data.export import png_bytes

    base = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(7)
    splits = {"train": _images(rng, 4), "test": _images(rng, 2)}
    encoded = {split: [png_bytes(im) for im in images] for split, (images, _) in splits.items()}
    out = {}
    # an image folder: a truncated PNG and a text file named .png
    root = base / "imagefolder"
    for split, (images, labels) in splits.items():
        write_imagefolder(root, split, images, labels, CLASSES)
    bee, cat = root / "train" / "bee" / "05.png", root / "train" / "cat" / "09.png"
    bee.write_bytes(encoded["train"][5][:60])
    cat.write_bytes(b"a text file named .png")
    out["imagefolder"] = (root, [i for i in range(16) if i not in (5, 9)],
                          [f"cannot decode image {bee}: image file is truncated",
                           f"cannot decode image {cat}: {NOT_AN_IMAGE}"], [])
    # Parquet: a corrupt image cell, and a file that is not Parquet at all
    root = base / "parquet"
    for split, (_, labels) in splits.items():
        (root / split).mkdir(parents=True)
        cells = list(encoded[split])
        if split == "train":
            cells[7] = b"\x89PNG\r\n\x1a\n garbage"
        pq.write_table(pa.table({"image": cells, "label": [CLASSES[c] for c in labels]}),
                       root / split / "a.parquet", row_group_size=5)
    (root / "train" / "b.parquet").write_bytes(b"PAR1 not really")
    out["parquet"] = (root, [i for i in range(16) if i != 7],
                      [f"cannot decode image {root / 'train' / 'a.parquet'} (row group 1, row 2): "
                       "Truncated File Read"],
                      [f"cannot read Parquet file {root / 'train' / 'b.parquet'}: "])
    # WebDataset: a garbage image member, and a shard cut inside its last sample's image
    root = base / "webdataset"
    for split, (_, labels) in splits.items():
        (root / split).mkdir(parents=True)
        for shard, start in enumerate(range(0, len(labels), 5)):
            with tarfile.open(root / split / f"shard-{shard}.tar", "w") as tar:
                for i in range(start, min(start + 5, len(labels))):
                    image = b"garbage" if (split, i) == ("train", 3) else encoded[split][i]
                    for ext, data in ((".png", image), (".cls", CLASSES[labels[i]].encode())):
                        info = tarfile.TarInfo(f"{i:02d}{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    with tarfile.open(root / "train" / "shard-0.tar") as tar:
        garbage = tar.getmember("03.png").offset_data
    last = root / "train" / "shard-3.tar"
    with tarfile.open(last) as tar:
        cut = tar.getmember("15.png").offset_data + 10
    last.write_bytes(last.read_bytes()[:cut])
    out["webdataset"] = (root, [i for i in range(16) if i not in (3, 15)],
                         [f"cannot decode image {root / 'train' / 'shard-0.tar'} (member at byte {garbage}): "
                          f"{NOT_AN_IMAGE}"],
                         [f"cannot read WebDataset shard {last}: unexpected end of data"])
    return out, splits


def _skip(root, kind: str, loading: str = "memory") -> DataConfig:
    return DataConfig(dataset=kind, root=str(root), image_size=8, loading=loading, bad_images="skip")


def test_bad_images_error_names_the_file_skip_leaves_them_out(damaged):
    from orchestrator.data.encoded import skipped_images

    data, splits = damaged
    for kind, (root, kept, skipped, damaged_files) in data.items():
        # error (the default): the first bad file is named
        first = (damaged_files or skipped)[0].split(":")[0]
        with pytest.raises(DataError, match=re.escape(first)):
            load_split(DataConfig(dataset=kind, root=str(root), image_size=8), "train")
        # skip: the good samples only, the errors recorded exactly, in sample order
        train, test = load_split(_skip(root, kind), "train"), load_split(_skip(root, kind), "test")
        assert train.labels.tolist() == splits["train"][1][kept].tolist() and train.class_names == CLASSES, kind
        assert train.sample_ids.tolist() == list(range(len(kept)))
        assert len(test) == 8
        facts = skipped_images(_skip(root, kind))
        assert facts["train"]["skipped"] == len(skipped) and facts["train"]["first"] == skipped, kind
        assert [f[:len(e)] for f, e in zip(facts["train"]["damaged_files"], damaged_files)] == damaged_files, kind
        assert len(facts["train"]["damaged_files"]) == len(damaged_files)
        assert facts["test"] == {"skipped": 0, "first": [], "damaged_files": []}
        index = split_index(_skip(root, kind), "train")
        np.testing.assert_array_equal(read_images(index.source, index.rows(np.arange(len(index)))), train.images)
    # the same pixels as the images that were kept, in every format
    reference = data["imagefolder"][1]
    folder = load_split(_skip(data["imagefolder"][0], "imagefolder"), "train")
    for kind in ("parquet", "webdataset"):
        root, kept, *_ = data[kind]
        images = load_split(_skip(root, kind), "train").images
        common = sorted(set(kept) & set(reference))
        np.testing.assert_array_equal(images[[kept.index(i) for i in common]],
                                      folder.images[[reference.index(i) for i in common]])


def test_skipping_may_not_empty_a_class_and_is_for_files_only(tmp_path):
    images, labels = _images(np.random.default_rng(8), 2)
    write_imagefolder(tmp_path, "train", images, labels, CLASSES)
    write_imagefolder(tmp_path, "test", images, labels, CLASSES)
    for name in os.listdir(tmp_path / "train" / "cat"):
        (tmp_path / "train" / "cat" / name).write_bytes(b"")
    with pytest.raises(DataError, match="every image of class 'cat' is unreadable"):
        split_index(_skip(tmp_path, "imagefolder"), "train")
    with pytest.raises(ConfigError, match="data.bad_images.*file-backed"):
        load_config(None, ["data.bad_images=skip"])
    with pytest.raises(ConfigError, match="data.bad_images.*allowed values"):
        load_config(None, ["data.bad_images=ignore"])


def test_a_corrupt_parquet_row_group_costs_exactly_its_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data.export import png_bytes

    images, labels = _images(np.random.default_rng(9), 3)
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        pq.write_table(pa.table({"image": [png_bytes(im) for im in images], "label": [CLASSES[c] for c in labels]}),
                       tmp_path / split / "x.parquet", row_group_size=2, compression="none")
    path = tmp_path / "train" / "x.parquet"
    start = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset  # the image column's page header
    damaged = bytearray(path.read_bytes())
    damaged[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"cannot read row group 1 of Parquet file .*x\.parquet"):
        load_split(DataConfig(dataset="parquet", root=str(tmp_path), image_size=8), "train")
    index = split_index(_skip(tmp_path, "parquet"), "train")
    assert index.labels.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]  # rows 2 and 3 (row group 1) left out
    assert len(index.skipped) == 2 and all(e.startswith(f"cannot read row group 1 of Parquet file {path}: ")
                                           for e in index.skipped)


def test_the_line_a_run_prints_about_skipped_images():
    from orchestrator.reporting.report import skipped_images_line

    clean = {"skipped": 0, "first": [], "damaged_files": []}
    assert skipped_images_line({}) is None and skipped_images_line({"data": {"train": clean, "test": clean}}) is None
    damaged = {"skipped": 0, "first": [], "damaged_files": ["cannot read WebDataset shard x.tar: ..."]}
    assert skipped_images_line({"data": {"train": damaged, "test": clean},
                                "evaluation.sets.other.data": {"train": clean, "test": {**clean, "skipped": 3}}}) == (
        "Skipped unreadable images (bad_images: skip): evaluation.sets.other.data test 3; 1 damaged file(s), whose "
        "unlocated samples are not counted; listed in report.md")


# ---- Ray Data ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_streamed_batches_equal_in_memory_batches(ray_local, roots):
    order = np.random.default_rng(3).permutation(32)[:27]  # a selection, shuffled: a step's epoch
    for kind in KINDS:
        memory, streamed = open_split(_cfg(roots, kind), "train"), open_split(_cfg(roots, kind, "stream"), "train")
        assert isinstance(streamed, StreamedImages) and not hasattr(streamed, "images")
        expected = [b.numpy() for b in memory.batches(order, 4)]
        got = [b.numpy() for b in streamed.batches(order, 4)]
        assert [len(b) for b in got] == [4] * 6 + [3]
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
        assert (streamed.mean, streamed.std) == (memory.mean, memory.std)  # one streamed pass, exact


def test_a_streamed_undecodable_image_is_named(ray_local, tmp_path):
    images, labels = _images(np.random.default_rng(4), 2)
    write_imagefolder(tmp_path, "train", images, labels, CLASSES)
    (tmp_path / "train" / "cat" / "5.png").write_bytes(b"\x89PNG broken")
    data = open_split(DataConfig(dataset="imagefolder", root=str(tmp_path), loading="stream"), "train")
    with pytest.raises(DataError, match=r"cannot decode image .*cat/5\.png"):
        list(data.batches(np.arange(len(data)), 4))


def test_a_streamed_run_on_a_train_worker_matches_the_in_memory_run(ray_local, roots, tmp_path):
    """One Train worker streams (training batches, store embeddings, accuracy); the in-process run
    decodes everything into memory; same seed, same numbers."""
    common = ["data.dataset=imagefolder", f"data.root={roots['imagefolder']}", "data.image_size=8",
              "scenario.initial_classes=3", "scenario.num_steps=1", "model.width=4", "model.embedding_dim=8",
              "training.epochs=1", "training.batch_size=8", "data.normalization=imagenet",
              "methods=[{name: independent}]", "evaluation.batch_size=5"]
    runs = {}
    for loading, workers in (("stream", 1), ("memory", 0)):
        cfg = load_config(None, [*common, f"data.loading={loading}", f"resources.num_workers={workers}",
                                 f"output_dir={tmp_path / loading}", f"name=run-{loading}"])
        run_experiment(cfg, progress=False, echo=lambda *_: None)
        runs[loading] = tmp_path / loading / f"run-{loading}"
    streamed, in_memory = (manifest_entry(runs[k], "independent", 0) for k in runs)
    assert streamed["placement"]["pid"] != os.getpid() == in_memory["placement"]["pid"]  # a Train worker's
    assert streamed["train_samples"] == in_memory["train_samples"] == 24  # 3 of the 4 classes
    for key in ("losses", "accuracy", "accuracy_new_classes"):
        assert streamed[key] == in_memory[key], key
    metrics = [json.loads((runs[k] / "metrics.json").read_text())["methods"]["independent"] for k in runs]
    for m in metrics:
        m.pop("seconds")  # wall-clock
    assert metrics[0] == metrics[1]  # the compatibility matrices: same embeddings in the store


def test_skipped_images_stream_as_in_memory_and_reach_the_report(ray_local, damaged, tmp_path, capfd):
    """With bad_images: skip the streamed path reads the same samples as the in-memory one; a streamed
    in-process run's metrics.json, report.md and first lines say what was skipped, and Ray Data's
    per-execution INFO lines stay off the terminal (they would print over the progress line)."""
    data, _ = damaged
    for kind, (root, kept, *_) in data.items():
        memory, streamed = open_split(_skip(root, kind), "train"), open_split(_skip(root, kind, "stream"), "train")
        assert isinstance(streamed, StreamedImages) and streamed.labels.tolist() == memory.labels.tolist()
        order = np.random.default_rng(9).permutation(len(kept))
        expected = [b.numpy() for b in memory.batches(order, 4)]
        got = [b.numpy() for b in streamed.batches(order, 4)]
        assert len(got) == len(expected) == 4
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
        assert (streamed.mean, streamed.std) == (memory.mean, memory.std)
    root, _, skipped, _ = data["imagefolder"]
    lines = []
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.image_size=8",
                             "data.bad_images=skip", "data.loading=stream", "scenario.initial_classes=3",
                             "scenario.num_steps=1", "model.width=4", "model.embedding_dim=8", "training.epochs=1",
                             "training.batch_size=8", "methods=[{name: independent}]", "resources.num_workers=0",
                             f"output_dir={tmp_path}", "name=skipping"])
    capfd.readouterr()
    run_experiment(cfg, progress=False, echo=lines.append)
    out, err = capfd.readouterr()
    assert "execution finished" not in out + err and "Dataset" not in out + err
    assert lines[1] == "Skipped unreadable images (bad_images: skip): data train 2; listed in report.md"
    metrics = json.loads((tmp_path / "skipping" / "metrics.json").read_text())
    assert metrics["skipped_images"]["data"]["train"] == {"skipped": 2, "first": skipped, "damaged_files": []}
    assert manifest_entry(tmp_path / "skipping", "independent", 0)["train_samples"] == 10  # 12 of ant, bee, cat - 2
    report = (tmp_path / "skipping" / "report.md").read_text()
    assert "- `data` train: 2 image(s) skipped" in report and f"  - {skipped[1]}" in report


def test_decoding_blocks_start_with_one_batch_and_double_up_to_the_byte_target():
    batch, image = 64, 3 * 32 * 32  # 16 MiB holds 5461 such images: 85 whole batches
    assert block_rows(10_000, batch, image) == [64, 128, 256, 512, 1024, 2048, 4096, 1872]
    assert block_rows(40_000, batch, image)[7:] == [5440] * 5 + [40_000 - 8128 - 5 * 5440]
    assert block_rows(50, batch, image) == [50] and block_rows(0, batch, image) == []
    big = 3 * 512 * 512  # 21 images fill BLOCK_BYTES: a block still holds one whole batch
    assert BLOCK_BYTES // big < batch and block_rows(200, batch, big) == [64, 64, 64, 8]
