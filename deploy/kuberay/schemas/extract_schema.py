"""Write the validation schema of one KubeRay CRD as compact JSON (the files next to this script).

    python extract_schema.py ray.io_rayclusters.yaml > raycluster-v1.json

Reads a CustomResourceDefinition, keeps the ``openAPIV3Schema`` of its ``v1`` version and drops every
``description`` (documentation only: validation is unchanged, the file is several times smaller). Run
it on the CRDs of the KubeRay release named in README.md to refresh the vendored schemas.
"""

from __future__ import annotations

import json
import sys

import yaml


def schema_of(crd: dict, version: str = "v1") -> dict:
    """The openAPIV3Schema of ``version`` in a CustomResourceDefinition, without descriptions."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return _without_descriptions(entry["schema"]["openAPIV3Schema"])
    raise SystemExit(f"{crd['metadata']['name']} has no version {version}")


def _without_descriptions(node):
    if isinstance(node, dict):
        # a property *named* "description" stays: only the documentation keyword goes
        return {k: _without_descriptions(v) for k, v in node.items()
                if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        json.dump(schema_of(yaml.safe_load(handle)), sys.stdout, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")
