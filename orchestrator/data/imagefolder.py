"""A directory of images, one sub-directory per class: ``root/{train,test}/<class>/<image>``, on a local
path or any URI pyarrow.fs opens (``s3://``, ``gs://``, ...).

Each split is listed once, recursively, through pyarrow.fs; its index (orchestrator/data/encoded.py)
stores each image's path relative to the split directory, and its cache key covers every file's path,
size and modification time, so editing the folder invalidates it. Images are read through the same
filesystem, decoded once into the cache (in memory) or by Ray Data tasks (streamed).
"""

from __future__ import annotations

from orchestrator.config import DataConfig
from orchestrator.data import Split, register_dataset
from orchestrator.data.encoded import EncodedFiles, split_index
from orchestrator.data.formats import IMAGE_EXTENSIONS as EXTENSIONS
from orchestrator.data.formats import _join, list_entries, split_root
from orchestrator.errors import DataError

CLASS_LAYOUT = "<class>/<image> below it"  # what a split directory holds, for the error when it is missing


def class_directories(root: str) -> list[str]:
    """The class directories of the split directory ``root``, in name order; hidden ones
    (.ipynb_checkpoints, ...) are not classes. One listing of ``root`` itself, not of the images."""
    import pyarrow.fs as pafs

    names = sorted(rel for rel, info in list_entries(root, CLASS_LAYOUT)
                   if info.type == pafs.FileType.Directory and not rel.startswith("."))
    if not names:
        raise DataError(f"{root} has no class directories")
    return names


def folder_listing(root: str, classes: list[str]) -> list[tuple[int, str, int, int]]:
    """(label, ``<class>/<file>``, mtime_ns, size) of every image under the split directory ``root``, in
    class then file-name order, from one recursive listing; ``classes`` are the train split's."""
    import pyarrow.fs as pafs

    index = {name: i for i, name in enumerate(classes)}
    found: dict[str, list] = {}
    for rel, info in list_entries(root, CLASS_LAYOUT, recursive=True):
        parts = rel.split("/")
        if parts[0].startswith("."):
            continue
        if len(parts) == 1 and info.type == pafs.FileType.Directory:
            found.setdefault(parts[0], [])
        elif len(parts) == 2 and info.type == pafs.FileType.File and parts[1].lower().endswith(EXTENSIONS):
            found.setdefault(parts[0], []).append((parts[1], info.mtime_ns or 0, info.size))
    files = []
    for name in sorted(found):
        if name not in index:
            raise DataError(f"{_join(root, name)} is not one of the training classes ({len(classes)} directories "
                            f"of the train split)")
        if not found[name]:
            raise DataError(f"class directory {_join(root, name)} holds no images ({', '.join(EXTENSIONS)})")
        files.extend((index[name], f"{name}/{file}", mtime, size) for file, mtime, size in sorted(found[name]))
    return files


def image_paths(cfg: DataConfig, split: Split) -> list[str]:
    """``<class>/<file>`` of every image of ``split`` in sample-id order (FSCIL session index files name
    images by path): its index's, which leaves out what ``data.bad_images: skip`` skipped."""
    return [path.decode() for path in split_index(cfg, split).locators["path"].tolist()]


@register_dataset("imagefolder")
class ImageFolder(EncodedFiles):
    def class_names(self, cfg: DataConfig) -> list[str]:
        """The train split's class directories (one listing of them, not of their images)."""
        return class_directories(split_root(cfg, "train"))
