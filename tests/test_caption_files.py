"""Caption annotation files: every supported format parsed, malformed files named with their line."""

import json

import numpy as np
import pytest
from PIL import Image

from orchestrator.data.caption_files import (load_images, read_caption_file, read_csv_pairs,
                                             read_karpathy_json, read_text_corpus)
from orchestrator.errors import DataError


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (12, 8), colour).save(folder / f"im{i}.png")
    return folder


def karpathy(tmp_path, images) -> str:
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": images}, indent=1))
    return path


def entry(name, split, *sentences, tokens=False):
    sents = [{"tokens": s.split()} if tokens else {"raw": s} for s in sentences]
    return {"filename": name, "split": split, "sentences": sents}


def test_karpathy_json_several_captions_per_image_and_split_selection(tmp_path, image_dir):
    path = karpathy(tmp_path, [entry("im0.png", "train", "a red card", "red paper"),
                               entry("im1.png", "val", "a green card", "green", tokens=True),
                               entry("im2.png", "restval", "blue")])
    index = read_karpathy_json(path, image_root=image_dir)
    assert [p.name for p in index.image_paths] == ["im0.png", "im1.png", "im2.png"]
    assert index.captions == ["a red card", "red paper", "a green card", "green", "blue"]
    assert index.caption_of.tolist() == [0, 0, 1, 1, 2]
    coco = read_caption_file(path, image_root=image_dir, splits=["val", "restval"])
    assert [p.name for p in coco.image_paths] == ["im1.png", "im2.png"] and coco.caption_of.tolist() == [0, 0, 1]


def test_karpathy_filepath_is_joined_under_the_root(tmp_path, image_dir):
    path = karpathy(tmp_path, [{**entry("im0.png", "val", "red"), "filepath": "imgs"}])
    assert read_karpathy_json(path).image_paths == [image_dir / "im0.png"]  # root: the file's directory


def test_csv_and_jsonl_group_rows_by_image(tmp_path, image_dir):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('image,caption\nimgs/im1.png,"green, bright"\nimgs/im0.png,red\nimgs/im1.png,grass\n')
    index = read_csv_pairs(csv_path)
    assert [p.name for p in index.image_paths] == ["im1.png", "im0.png"]
    assert index.captions == ["green, bright", "grass", "red"] and index.caption_of.tolist() == [0, 0, 1]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"image": "im2.png", "captions": ["blue", "sky"]}\n\n{"image": "im0.png", "caption": "red"}\n')
    index = read_caption_file(jsonl, image_root=image_dir)
    assert index.captions == ["blue", "sky", "red"] and index.caption_of.tolist() == [0, 0, 1]
    sub = index.subset(np.array([1, 0]))
    assert sub.captions == ["red", "blue", "sky"] and sub.caption_of.tolist() == [0, 1, 1]


def test_text_corpus_one_caption_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("a dog on grass\n\n  two cats  \n")
    assert read_text_corpus(path) == ["a dog on grass", "two cats"]


@pytest.mark.parametrize("name, text, where", [
    ("bad.json", '{"images": [\n  {"filename": "im0.png",\n   "sentences": [}\n]}', "line 3"),
    ("bad.csv", "image,caption\nim0.png,red\nim1.png\n", "line 3"),
    ("bad2.csv", "image,text\nim0.png,red\n", "line 1"),
    ("bad3.csv", "image,caption\nim0.png,\n", "line 2"),
    ("bad.jsonl", '{"image": "im0.png", "caption": "red"}\n{"image": "im1.png", "caption": "green"\n', "line 2"),
    ("bad2.jsonl", '{"image": "im0.png", "caption": "red"}\n\n{"image": "im1.png"}\n', "line 3"),
    ("missing.jsonl", '{"image": "nope.png", "caption": "red"}\n', "line 1"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, image_dir, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_caption_file(path, image_root=image_dir)
    assert str(path) in str(err.value) and where in str(err.value)


def test_karpathy_structural_errors_name_the_entry(tmp_path, image_dir):
    path = karpathy(tmp_path, [entry("im0.png", "val", "red"), {"filename": "im1.png", "split": "val"}])
    with pytest.raises(DataError, match=r"images\[1\].*sentences"):
        read_karpathy_json(path, image_root=image_dir)
    with pytest.raises(DataError, match="no image in splits"):
        read_karpathy_json(karpathy(tmp_path, [entry("im0.png", "val", "red")]), image_dir, splits=["test"])


def test_corpus_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match="no caption"):
        read_text_corpus(empty)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match="line 3.*UTF-8"):
        read_text_corpus(binary)
    with pytest.raises(DataError, match="unknown caption file format"):
        read_caption_file(tmp_path / "x.xml")


def test_load_images_resizes_and_centre_crops(tmp_path, image_dir):
    paths = [image_dir / "im0.png", image_dir / "im2.png"]
    images = load_images(paths, size=6, cache_dir=tmp_path / "cache")
    assert images.shape == (2, 6, 6, 3) and images.dtype == np.uint8
    assert images[0, ..., 0].min() == 255 and images[1, ..., 2].min() == 255
    assert np.array_equal(load_images(paths, size=6, cache_dir=tmp_path / "cache"), images)
