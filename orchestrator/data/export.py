"""Write a split as encoded PNG files in the three file formats the streaming path reads: an image folder,
Parquet files and WebDataset tar shards (e.g. the synthetic dataset, to try streaming or to benchmark it).
Each writes ``<root>/<split>/...`` so that ``data.root: <root>`` with the matching ``data.dataset`` reads it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def write_imagefolder(root, split: str, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> Path:
    """``root/split/<class>/<index>.png``; the index is zero-padded so name order is sample order."""
    base = Path(root) / split
    width = len(str(max(len(images) - 1, 0)))
    for name in class_names:
        (base / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        (base / class_names[label] / f"{i:0{width}d}.png").write_bytes(png_bytes(image))
    return base


def write_parquet(root, split: str, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
                  rows_per_file: int = 100_000, row_group_size: int = 1000) -> Path:
    """``root/split/part-NNNNN.parquet`` with columns ``image`` (PNG bytes) and ``label`` (class name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = Path(root) / split
    base.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, len(images), rows_per_file)):
        stop = min(start + rows_per_file, len(images))
        table = pa.table({"image": pa.array([png_bytes(im) for im in images[start:stop]], type=pa.binary()),
                          "label": pa.array([class_names[label] for label in labels[start:stop]])})
        pq.write_table(table, base / f"part-{part:05d}.parquet", row_group_size=row_group_size)
    return base


def write_webdataset(root, split: str, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
                     samples_per_shard: int = 10_000) -> Path:
    """``root/split/shard-NNNNN.tar``, sample ``k`` as ``<k>.png`` and ``<k>.cls`` (the class name)."""
    base = Path(root) / split
    base.mkdir(parents=True, exist_ok=True)
    width = len(str(max(len(images) - 1, 0)))
    for shard, start in enumerate(range(0, len(images), samples_per_shard)):
        with tarfile.open(base / f"shard-{shard:05d}.tar", "w") as tar:
            for i in range(start, min(start + samples_per_shard, len(images))):
                for ext, data in ((".png", png_bytes(images[i])), (".cls", class_names[labels[i]].encode())):
                    info = tarfile.TarInfo(f"{i:0{width}d}{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return base


WRITERS = {"imagefolder": write_imagefolder, "parquet": write_parquet, "webdataset": write_webdataset}
