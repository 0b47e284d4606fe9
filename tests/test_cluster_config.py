"""cluster.yaml is a valid Ray cluster-launcher config (schema check, no cloud calls)."""

from pathlib import Path

import yaml


def test_cluster_yaml_validates():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    prepared = prepare_config(cfg)
    validate_config(prepared)
    assert prepared["available_node_types"]["head"]["resources"]["TRAIN_DRIVER_RESOURCE"] > 0
