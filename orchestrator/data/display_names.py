"""Class names as text: the dataset's own names, or those of ``data.class_names_file``.

Text-based methods (CLIP prompts, zero-shot) read class names; some datasets name classes by id
(miniImageNet's WordNet ids). A names file maps each class to the name its text uses, one
``<class> <name>`` per line (the name may contain spaces); every class of the dataset must appear.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import DataConfig
from orchestrator.errors import ConfigError


def display_names(cfg: DataConfig, dataset_names: list[str], key: str = "data.class_names_file") -> list[str]:
    """``dataset_names`` with every entry replaced by its name in ``cfg.class_names_file`` (if set)."""
    if cfg.class_names_file is None:
        return list(dataset_names)
    path = Path(cfg.class_names_file).expanduser()
    if not path.is_file():
        raise ConfigError(key, f"{path} does not exist (expected lines '<class> <name used in text>')")
    mapping = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ConfigError(key, f"{path} line {number}: expected '<class> <name used in text>', got {line!r}")
        mapping[parts[0]] = parts[1].strip()
    missing = [name for name in dataset_names if name not in mapping]
    if missing:
        raise ConfigError(key, f"{path} names {len(dataset_names) - len(missing)} of the {len(dataset_names)} classes; "
                               f"missing e.g. {missing[:3]}")
    return [mapping[name] for name in dataset_names]
