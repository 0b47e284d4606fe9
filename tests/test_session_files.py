"""FSCIL training images per session: seeded shot sampling, and session index files in the CEC format."""

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.config import DataConfig
from orchestrator import load_config
from orchestrator.data.display_names import display_names
from orchestrator.errors import ConfigError, DataError
from orchestrator.engine.scenarios import plan_steps, train_indices
from orchestrator.engine.worker import Session, Worker
from orchestrator.engine.session_files import plan_from_files, resolve_entries, session_file_paths


def test_shot_sampling_is_seeded_and_gives_exactly_k_images_per_new_class():
    cfg = load_config(None, ["scenario.kind=few-shot", "scenario.shots=5", "scenario.initial_classes=4",
                             "scenario.increment=2", "scenario.num_steps=3", "scenario.training_data=new",
                             "data.num_classes=8"])
    positions = np.repeat(np.arange(8), 20)
    steps = plan_steps(cfg, 8)
    base = train_indices(positions, steps[0], seed=0)
    assert len(base) == 4 * 20  # the base session keeps every image of its classes
    first = train_indices(positions, steps[1], seed=0)
    assert np.array_equal(first, train_indices(positions, steps[1], seed=0))
    assert not np.array_equal(first, train_indices(positions, steps[1], seed=1))
    assert np.bincount(positions[first], minlength=8).tolist() == [0, 0, 0, 0, 5, 5, 0, 0]
    assert not np.array_equal(first, train_indices(positions, steps[2], seed=0))


def write_sessions(folder, sessions):
    folder.mkdir(exist_ok=True)
    for t, lines in enumerate(sessions, 1):
        (folder / f"session_{t}.txt").write_text("\n".join(map(str, lines)) + "\n\n")
    return folder


def test_integer_index_files_give_the_images_and_the_class_order(tmp_path):
    labels = np.repeat(np.arange(6), 4)  # 24 training images, 4 per class
    base = [i for i in range(24) if labels[i] in (3, 1)]
    folder = write_sessions(tmp_path / "idx", [base, [0, 1, 20, 21], [8, 9, 10, 11]])
    plan = plan_from_files(session_file_paths(str(folder), 3), labels, 6, None, [2, 2, 1], shots=None)
    assert plan.order.tolist() == [1, 3, 0, 5, 2, 4]  # sessions' classes first (by label within one), rest after
    assert [ix.tolist() for ix in plan.indices[1:]] == [[0, 1, 20, 21], [8, 9, 10, 11]]
    with pytest.raises(DataError, match="lists 2 images of a new class; scenario.shots is 4"):
        plan_from_files(session_file_paths(str(folder), 3), labels, 6, None, [2, 2, 1], shots=4)
    with pytest.raises(DataError, match="introduces 2 new classes; step 0 of the scenario expects 3"):
        plan_from_files(session_file_paths(str(folder), 3), labels, 6, None, [3, 2, 1], shots=None)
    with pytest.raises(DataError, match="out of range"):
        resolve_entries(["3", "24"], folder / "x.txt", 24, None)
    with pytest.raises(ConfigError, match="session_4.txt"):
        session_file_paths(str(folder), 4)


def test_path_entries_match_class_and_file_of_an_image_folder(tmp_path):
    paths = ["n01/a.jpg", "n01/b.jpg", "n02/c.jpg"]
    entries = ["MINI-ImageNet/train/n02/c.jpg", "n01\\b.jpg"]
    assert resolve_entries(entries, tmp_path / "s.txt", 3, paths).tolist() == [2, 1]
    with pytest.raises(DataError, match="line 1"):
        resolve_entries(["train/n03/d.jpg"], tmp_path / "s.txt", 3, paths)
    with pytest.raises(DataError, match="no image paths"):
        resolve_entries(["n01/a.jpg"], tmp_path / "s.txt", 3, None)


def test_a_session_reads_index_files_of_an_image_folder(tmp_path):
    root = tmp_path / "folder"
    for split, per_class in (("train", 3), ("test", 1)):
        for c, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
            (root / split / f"cls{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (10, 10), colour).save(root / split / f"cls{c}" / f"img{i}.png")
    folder = write_sessions(tmp_path / "idx", [["CUB/images/cls2/img0.png", "CUB/images/cls2/img1.png"],
                                               ["CUB/images/cls0/img2.png"]])
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={root}", "data.image_size=8",
                             "scenario.kind=few-shot", "scenario.shots=1", "scenario.initial_classes=1",
                             "scenario.increment=1", "scenario.num_steps=2", f"scenario.session_files={folder}",
                             "methods=[{name: independent}]", "resources.num_workers=0"])
    session = Session(cfg, cfg.methods[0], tmp_path / "run", Worker(0, 1, torch.device("cpu")), tmp_path)
    assert session.order.tolist() == [2, 0, 1]
    assert session.class_names == ["cls2", "cls0", "cls1"]
    assert session.sessions.indices[0].tolist() == [6, 7] and session.sessions.indices[1].tolist() == [2]
    assert session.train_positions[[2, 6, 7]].tolist() == [1, 0, 0]
    with pytest.raises(ConfigError, match="class_order"):
        load_config(None, [f"scenario.session_files={folder}", "scenario.class_order=seeded"])


def test_missing_session_directory_fails_validation(tmp_path):
    with pytest.raises(ConfigError, match="scenario.session_files"):
        load_config(None, [f"scenario.session_files={tmp_path / 'none'}", "resources.num_workers=0"])


def test_class_names_file_renames_classes_for_text(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cls0 red square\n\ncls1 green\ncls2 blue thing\n")
    data = DataConfig(class_names_file=str(names))
    assert display_names(data, ["cls2", "cls0"]) == ["blue thing", "red square"]
    with pytest.raises(ConfigError, match="missing e.g. \\['cls9'\\]"):
        display_names(data, ["cls0", "cls9"])
    names.write_text("lonely\n")
    with pytest.raises(ConfigError, match="line 1"):
        display_names(data, ["cls0"])
