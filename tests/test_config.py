from pathlib import Path

import pytest
import yaml

from orchestrator.config import ExperimentConfig, apply_override
from orchestrator import load_config
from orchestrator.engine.validate import parse_experiment
from orchestrator.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict:
    return yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())


def test_quickstart_is_valid():
    cfg = load_config(None)
    assert cfg.name == "quickstart"
    assert [m.key for m in cfg.methods] == ["independent", "bct"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_its_schema(path):
    from orchestrator.config.typed import from_dict

    data = yaml.safe_load(path.read_text())
    if "sweep" in data:
        data = {k: v for k, v in data.items() if k != "sweep"}
    if data.get("kind") == "cross-modal":  # its own experiment schema (orchestrator/config/crossmodal.py)
        from orchestrator.config.crossmodal import CrossModalExperiment

        from_dict(CrossModalExperiment, data)
        return
    from_dict(ExperimentConfig, data)  # schema only: real datasets may be absent on this machine


def test_unknown_key_names_its_path():
    data = base()
    data["training"]["epoch"] = 3
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert err.value.key == "training.epoch"
    assert "epochs" in str(err.value)  # the allowed keys are listed


def test_wrong_type_names_its_path():
    data = base()
    data["training"]["lr"] = "fast"
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert err.value.key == "training.lr" and "number" in str(err.value)


def test_bad_literal_lists_allowed_values():
    data = base()
    data["evaluation"]["protocol"] = "knn"
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert err.value.key == "evaluation.protocol" and "'leave-one-out'" in str(err.value)


def test_more_classes_than_the_dataset_has():
    data = base()
    data["scenario"]["num_steps"] = 5  # 10 + 4*5 = 30 > 20 synthetic classes
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert err.value.key == "scenario.num_steps" and "20" in str(err.value)


def test_post_init_errors_are_prefixed_with_their_section():
    data = base()
    data["training"]["epochs"] = 0
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert err.value.key == "training.epochs"


def test_method_params_are_validated():
    data = base()
    data["methods"][1]["params"]["variant"] = "fancy"
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert err.value.key == "methods.1.params.variant"


def test_unknown_method():
    data = base()
    data["methods"].append({"name": "magic"})
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert "bct" in str(err.value) and "independent" in str(err.value)


def test_duplicate_method_labels():
    data = base()
    data["methods"].append({"name": "bct"})
    with pytest.raises(ConfigError, match="label"):
        parse_experiment(data)


def test_overrides():
    data = base()
    apply_override(data, "training.epochs=3")
    apply_override(data, "methods.1.params.logit_scale=8")
    apply_override(data, "model.final_relu=true")
    cfg = parse_experiment(data)
    assert cfg.training.epochs == 3 and cfg.methods[1].params["logit_scale"] == 8 and cfg.model.final_relu is True
    with pytest.raises(ConfigError):
        apply_override(data, "methods.7.params.x=1")
    with pytest.raises(ConfigError):
        apply_override(data, "no-equals-sign")


def test_method_training_overrides_are_validated():
    data = base()
    data["methods"][0]["training"] = {"epochs": -1}
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert err.value.key == "methods.0.training.epochs"


def test_digest_depends_on_seed():
    cfg = load_config(None)
    assert cfg.digest() != cfg.with_seed(1).digest()
    assert cfg.digest() == load_config(None).digest()


def test_missing_config_file_lists_builtins():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("does-not-exist")


def test_map_ties_needs_a_map():
    data = base()
    data["evaluation"].update(protocol="query-gallery", gallery="test", templates=True, primary="cmc1",
                              map_ties="shared")
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert err.value.key == "evaluation.map_ties" and "templates" in str(err.value)
    data["evaluation"]["map_ties"] = "average"
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert err.value.key == "evaluation.map_ties" and "'shared'" in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (["methods=[{name: stationary}]", "model.embedding_dim=32"], "model.embedding_dim"),
    (["methods=[{name: er}]", "model.normalize=false"], "model.normalize"),
    (["methods=[{name: stationary}, {name: er}]", "model.final_relu=true"], "model.final_relu"),
    (["methods=[{name: er}]", "model.embedding_bn=true"], "model.embedding_bn"),
    (["methods=[{name: oca}]", "model.normalize=false"], "model.normalize"),
    (["methods=[{name: independent}]", "model.name=tiny-vit-w32"], "model.name"),
])
def test_a_model_key_no_method_reads_is_a_config_error(tmp_path, overrides, key):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides + [f"output_dir={tmp_path}"])
    assert err.value.key == key and "does nothing" in err.value.message
    assert not any(tmp_path.iterdir())


def test_a_model_key_one_method_reads_is_fine():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(None, ["methods=[{name: stationary}, {name: independent}]", "model.embedding_dim=32"])
    assert cfg.model.embedding_dim == 32


def test_training_loader_workers_no_longer_exists():
    with pytest.raises(ConfigError, match="training.loader_workers.*unknown key"):
        load_config(None, ["training.loader_workers=2"])


def test_replacing_the_method_list_warns_about_the_settings_it_drops():
    from orchestrator.errors import ConfigWarning

    with pytest.warns(ConfigWarning, match=r"drops its settings: bct \(params: \{'variant': 'paper'\}\).*methods.N.params"):
        load_config(None, ["methods=[{name: bct}]"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped: no warning
        load_config(None, ["methods=[{name: independent}, {name: bct, params: {variant: paper}}, {name: oca}]"])
        load_config(None, ["methods.1.params.weight=2"])


def test_digest_hashes_only_what_differs_from_the_defaults_so_new_keys_keep_old_digests():
    from dataclasses import dataclass, field

    from orchestrator.config.typed import explicit_dict

    @dataclass
    class Before:
        lr: float = 0.1
        tags: list = field(default_factory=list)

    @dataclass
    class After(Before):  # the schema grew a key whose default keeps the old behaviour
        precision: str = "fp32"

    assert explicit_dict(Before(lr=0.5)) == explicit_dict(After(lr=0.5)) == {"lr": 0.5}
    assert explicit_dict(After(precision="bf16", tags=["a"])) == {"tags": ["a"], "precision": "bf16"}
    cfg = load_config(None, ["training.epochs=3"])
    explicit = explicit_dict(cfg)
    assert explicit["training"]["epochs"] == 3 and "precision" not in explicit["training"]
    # a run's stored config (every key written out) re-parses to the same digest
    assert parse_experiment(cfg.to_dict()).digest() == cfg.digest()
    assert load_config(None, ["training.precision=fp32"]).digest() == load_config(None).digest()


def test_digest_ignores_how_data_reaches_the_workers(tmp_path):
    """Streamed or in memory, decoded on which nodes: the same batches, so the same run (a resume may change them)."""
    from PIL import Image

    for split in ("train", "test"):
        for name in ("ant", "bee"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / split / name / "0.png")
    files = ["data.dataset=imagefolder", f"data.root={tmp_path}", "scenario.initial_classes=1", "scenario.increment=1",
             "scenario.num_steps=2"]
    base = load_config(None, files).digest()
    for delivery in (["data.loading=stream"], ["data.memory_limit_gb=0.5"], ["data.loading=stream", "data.decode_on=anywhere"]):
        assert load_config(None, files + delivery).digest() == base, delivery
    eval_set = "evaluation.sets={{test: {{data: {{dataset: imagefolder, root: {}{}}}}}}}"
    assert (load_config(None, files + [eval_set.format(tmp_path, ", loading: stream")]).digest()
            == load_config(None, files + [eval_set.format(tmp_path, "")]).digest())
    assert load_config(None, files + ["data.bad_images=skip"]).digest() != base  # which samples: part of the run
