"""Cross-modal data: training texts (stage-1 corpus, stage-2 pairs) never contain an evaluation caption;
every shipped cross-modal config carries the two controls of an XBT table."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from orchestrator.config.crossmodal import parse_crossmodal
from orchestrator.data.crossmodal import check_data, corpus_captions, eval_set, pair_set
from orchestrator.data.instance_captions import load_described
from orchestrator.errors import DataError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_synthetic_corpus_and_pairs_are_disjoint_from_the_evaluation_captions():
    cfg = parse_crossmodal(yaml.safe_load((CONFIGS / "xbt_synthetic.yaml").read_text())).data
    test = load_described(cfg.synthetic, "test", cfg.captions_per_image).captions
    train = load_described(cfg.synthetic, "train", cfg.captions_per_image).captions
    assert set(eval_set(cfg, 32).captions) == set(test)
    assert len(set(train) & set(test)) > len(set(test)) / 2  # the templated captions do repeat across splits
    corpus = corpus_captions(cfg)
    assert corpus == [c for c in dict.fromkeys(train) if c not in set(test)]  # all of train, less the test captions
    for seed in (0, 1):
        pairs = pair_set(cfg, seed, 32)
        assert len(pairs.images) == cfg.pair_count and np.array_equal(np.unique(pairs.caption_of),
                                                                       np.arange(cfg.pair_count))
        assert not set(pairs.captions) & set(test) and set(pairs.captions) <= set(train)


@pytest.fixture
def karpathy_files(tmp_path):
    """Six train images, two test images; three train captions repeat test captions up to case and
    spacing, and train images 1 and 5 have only such captions. Image i is a solid red of level 30 i."""
    for i in range(8):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(tmp_path / f"im{i}.png")
    test = {6: ["A dog on grass.", "a red card"], 7: ["two cats"]}
    train = {0: ["a dog  on grass.", "a brown dog"], 1: ["Two Cats"], 2: ["a boat"], 3: ["a car", "a red car"],
             4: ["a tree"], 5: ["A RED CARD", "two cats"]}
    images = [{"filename": f"im{i}.png", "split": split, "sentences": [{"raw": s} for s in sentences]}
              for split, captions in (("test", test), ("train", train)) for i, sentences in captions.items()]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    source = lambda split: {"path": str(path), "splits": [split]}  # noqa: E731
    return {"kind": "cross-modal", "name": "x",
            "models": {"old": {"name": "tiny-vit-w32"}, "new": {"name": "tiny-vit-w64"}},
            "data": {"source": "files", "eval": source("test"), "corpus": source("train"),
                     "pairs": source("train"), "pair_count": 4}}


def test_file_corpus_and_pairs_leave_out_evaluation_captions_up_to_case_and_spacing(karpathy_files):
    cfg = parse_crossmodal(karpathy_files).data
    check_data(cfg)
    assert corpus_captions(cfg) == ["a brown dog", "a boat", "a car", "a red car", "a tree"]
    pairs = pair_set(cfg, seed=0, image_size=8)  # the four train images that keep a caption, all drawn
    number = pairs.images[:, 0, 0, 0] // 30
    captions = {int(i): [pairs.captions[c] for c in np.flatnonzero(pairs.caption_of == k)]
                for k, i in enumerate(number)}
    assert captions == {0: ["a brown dog"], 2: ["a boat"], 3: ["a car", "a red car"], 4: ["a tree"]}


def test_too_few_images_with_unseen_captions_is_an_error_before_the_run(karpathy_files):
    karpathy_files["data"]["pair_count"] = 5  # six train images, but only four keep a caption
    with pytest.raises(DataError, match="pair_count is 5 but only 4 images"):
        check_data(parse_crossmodal(karpathy_files).data)


def test_a_corpus_made_only_of_evaluation_captions_is_an_error(karpathy_files, tmp_path):
    (tmp_path / "corpus.txt").write_text("two cats\nA Red Card\n")
    karpathy_files["data"]["corpus"] = {"path": str(tmp_path / "corpus.txt")}
    with pytest.raises(DataError, match="every caption of the corpus is also an evaluation caption"):
        check_data(parse_crossmodal(karpathy_files).data)


@pytest.mark.parametrize("name", ["xbt_synthetic", "xbt_coco", "xbt_flickr30k"])
def test_every_shipped_xbt_table_has_the_sigma0_and_no_stage1_rows(name):
    cfg = parse_crossmodal(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))
    xbt = [m.params for m in cfg.methods if m.name == "xbt"]
    main = xbt[0]
    assert [m.name for m in cfg.methods][:2] == ["procrustes", "xbt"]
    assert {**main, "noise_sigma": 0.0} in xbt and {**main, "text_stage": False} in xbt
