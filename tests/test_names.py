"""Safe names: experiment names, method labels, evaluation-set names and sweep names are single safe path
segments (one rule, orchestrator/config/typed.py's require_name); anything else is a config error that
names the key, before anything is written."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import load_raw
from orchestrator.config.typed import require_name
from orchestrator.engine.validate import parse_experiment
from orchestrator.errors import ConfigError
from orchestrator.tuning.sweep import parse_sweep
from test_xbt import TINY as CROSSMODAL

GOOD = ["a", "Z9", "0", "xbt-sigma0.05", "prompt_tuning", "a..b", "x" * 100]
BAD = ["", ".", "..", ".hidden", "-flag", "_x", "a/b", "../../x", "a\\b", "a b", " a", "a=b", "é", "x" * 101]


@pytest.mark.parametrize("name", GOOD)
def test_safe_names_pass(name):
    require_name(name, "name")


@pytest.mark.parametrize("name", BAD)
def test_unsafe_names_fail_naming_the_key(name):
    with pytest.raises(ConfigError) as err:
        require_name(name, "methods.3.label")
    assert err.value.key == "methods.3.label" and "not a safe name" in str(err.value)


def test_a_name_that_is_not_a_string_fails_naming_the_key():
    with pytest.raises(ConfigError) as err:
        parse_experiment(load_raw(None, ["evaluation.sets={7: {split: test}}", "evaluation.query=7"]))
    assert err.value.key == "evaluation.sets.7"


@pytest.mark.parametrize("overrides, key", [
    (["name=.."], "name"),
    (["name=a/b"], "name"),
    (["name=.hidden"], "name"),
    (["methods=[{name: bct, label: '../../x'}]"], "methods.0.label"),
    (["methods=[{name: independent}, {name: bct, label: 'b c'}]"], "methods.1.label"),
    (["evaluation.sets={'../q': {split: test}}", "evaluation.query=../q"], "evaluation.sets.../q"),
])
def test_compat_run_refuses_unsafe_names_and_writes_nothing(tmp_path, capsys, overrides, key):
    out = tmp_path / "out"
    code = main(["run", "--no-progress", "--output-dir", str(out), *[a for o in overrides for a in ("--set", o)]])
    assert code == 2
    assert f"config key '{key}'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("patch, key", [
    ({"name": "../x"}, "name"),
    ({"methods": [{"name": "procrustes", "label": "old/x"}]}, "methods.0.label"),
])
def test_cross_modal_names(tmp_path, capsys, patch, key):
    config = tmp_path / "crossmodal.yaml"
    config.write_text(yaml.safe_dump({**CROSSMODAL, **patch, "output_dir": str(tmp_path / "out")}))
    assert main(["run", str(config), "--no-progress"]) == 2
    assert f"config key '{key}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_name(tmp_path, capsys):
    document = load_raw("sweep_bct_synthetic", [f"output_dir={tmp_path / 'out'}", "sweep.name=../sweeps"])
    with pytest.raises(ConfigError) as err:
        parse_sweep(document)
    assert err.value.key == "sweep.name"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(document))
    assert main(["sweep", str(config), "--no-progress"]) == 2
    assert "config key 'sweep.name'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "sweeps").exists()
