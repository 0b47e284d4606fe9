"""Standalone evaluation commands: ``compat metrics`` on a saved matrix, ``compat compare`` on two embedding files.

They work on files produced anywhere (no run directory, no store), so a compatibility claim about two
models can be checked with the same formulas and protocols the orchestrator uses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.evaluation import metrics
from orchestrator.errors import DataError, StoreError
from orchestrator.evaluation import MAP_TIES, CompatibilityMatrix, retrieval_scores

SPLITS = ("query", "gallery")
PROTOCOLS = ("leave-one-out", "query-gallery")  # how two embedding files are scored
_RETRIEVAL_METRICS = ("cmc1", "cmc5", "map")
_TIES_HELP = ("whether a cross-test equal to the old self-test counts as compatible "
              "(default fail, as iamcl2r; pass = CL2R)")


def add_scoring_options(parser: argparse.ArgumentParser, *, protocol_default: Optional[str], protocol_note: str,
                        ties_help: str) -> None:
    """``--protocol`` and ``--ties``, as ``compat compare`` and ``compat check`` both take them for embedding files."""
    parser.add_argument("--protocol", choices=PROTOCOLS, default=protocol_default,
                        help="leave-one-out: every row is a query against all other rows (both files hold "
                             "the same samples in the same order; split is ignored); query-gallery: the "
                             f"split column separates queries from the gallery{protocol_note}")
    parser.add_argument("--ties", choices=metrics.TIES, default="fail", help=ties_help)


def add_metrics_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "metrics", help="AC, AM, BC and FC of a saved compatibility matrix",
        description="Compute AC, AM, BC and FC from a square CSV matrix: row i = query model i, column j = "
                    "gallery model j; cells above the diagonal are ignored; a header row and an index "
                    "column are optional. Values are taken as given: AM is 100x their mean, so fractions "
                    "give AM in percent; BC and FC are in the units of the values.")
    parser.add_argument("matrix", type=Path, help="CSV file of scores")
    parser.add_argument("--ties", choices=metrics.TIES, default="fail", help="AC: " + _TIES_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON object with AC, AM, BC, FC")
    parser.set_defaults(func=run_metrics)
    return parser


def add_compare_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare", help="check the empirical compatibility criterion between two embedding files",
        description="Score old/old, new/old (new queries vs old gallery) and new/new retrieval with CMC "
                    "top-1, top-5 and mAP, and report whether new/old beats old/old per metric. Files are "
                    "Parquet (columns label, embedding as a list of floats, optional split = query|gallery) "
                    "or .npz (arrays embeddings, labels, optional split).")
    parser.add_argument("--old", type=Path, required=True, help="embeddings from the old model")
    parser.add_argument("--new", type=Path, required=True, help="embeddings from the new model")
    add_scoring_options(parser, protocol_default="leave-one-out", protocol_note=" (default leave-one-out)",
                        ties_help="ECC: " + _TIES_HELP)
    parser.add_argument("--map-ties", choices=MAP_TIES, default="lower-index",
                        help="mAP for gallery items with equal similarity: lower-index (default) ranks the "
                             "lower row first, as CMC does; shared counts a tie as one threshold "
                             "(scikit-learn's average_precision_score)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: old_old, new_old, new_new, ecc")
    parser.set_defaults(func=run_compare)
    return parser


def run_metrics(args: argparse.Namespace) -> int:
    """``compat metrics``: print AC, AM, BC and FC of the matrix file."""
    matrix = CompatibilityMatrix.from_csv(args.matrix)
    if not matrix.complete:
        i, j = np.argwhere(metrics.lower_triangle_mask(matrix.size) & ~matrix.mask)[0]
        raise DataError(f"matrix file {args.matrix} has no value in cell ({i}, {j}); "
                        "every cell on and below the diagonal is needed")
    values = matrix.values
    result = {
        "AC": metrics.average_compatibility(values, args.ties),
        "AM": metrics.average_multimodel_accuracy(values),
        "BC": metrics.backward_compatibility(values),
        "FC": metrics.forward_compatibility(values),
    }
    if np.nanmax(values[metrics.lower_triangle_mask(matrix.size)]) > 1:
        print("note: values above 1 look like percentages; AM is 100x their mean", file=sys.stderr)
    if args.json:
        print(json.dumps({k: _json_number(v) for k, v in result.items()}))
        return 0
    print(f"AC  {result['AC']:.4f}  ({matrix.size} models, ties {args.ties})")
    print(f"AM  {result['AM']:.3f}")
    for name in ("BC", "FC"):
        print(f"{name}  {'n/a (one model)' if math.isnan(result[name]) else format(result[name], '+.3f')}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """``compat compare``: print the old/old, new/old and new/new cells and the ECC verdict per metric."""
    old, new = read_embedding_file(args.old), read_embedding_file(args.new)
    if args.protocol == "leave-one-out":
        if not np.array_equal(old[1], new[1]):
            raise DataError(f"{args.old} ({len(old[1])} rows) and {args.new} ({len(new[1])} rows) list different "
                            "labels row by row; leave-one-out needs the same samples in the same order in both")
        cells = {name: retrieval_scores(q[0], q[1], g[0], g[1], leave_one_out=True, map_ties=args.map_ties)
                 for name, q, g in (("old_old", old, old), ("new_old", new, old), ("new_new", new, new))}
    else:
        old_sides, new_sides = split_sides(args.old, old), split_sides(args.new, new)
        cells = {name: retrieval_scores(*q["query"], *g["gallery"], leave_one_out=False, map_ties=args.map_ties)
                 for name, q, g in (("old_old", old_sides, old_sides), ("new_old", new_sides, old_sides),
                                    ("new_new", new_sides, new_sides))}
    report = {**cells, "ecc": {m: bool(metrics.ecc_holds(cells["new_old"][m], cells["old_old"][m], args.ties))
                               for m in _RETRIEVAL_METRICS}}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{'':10}{'CMC top-1':>11}{'CMC top-5':>11}{'mAP':>9}")
    for name, label in (("old_old", "old/old"), ("new_old", "new/old"), ("new_new", "new/new")):
        print(f"{label:10}" + "".join(f"{cells[name][m]:>{w}.4f}" for m, w in zip(_RETRIEVAL_METRICS, (11, 11, 9))))
    verdict = ", ".join(f"{m} {'holds' if ok else 'fails'}" for m, ok in report["ecc"].items())
    print(f"ECC (new/old {metrics.ECC_COMPARISON[args.ties]} old/old, ties {args.ties}, {args.protocol}): {verdict}")
    return 0


def read_embedding_file(path: str | Path) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(embeddings float32 (N, d), labels int64 (N,), split as str array or None) from Parquet or .npz.

    Every way a file can be unusable (missing, truncated, missing column, ragged or null embeddings,
    unknown split values) raises StoreError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"embedding file {path} does not exist; pass the path of a Parquet or .npz file")
    embeddings, labels, split = _read_npz(path) if path.suffix == ".npz" else _read_parquet(path)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise StoreError(f"{path} holds no embeddings (shape {embeddings.shape}); write at least one row")
    if labels.shape != (len(embeddings),):
        raise StoreError(f"{path} has {len(embeddings)} embeddings but {labels.size} labels; write one label per row")
    if split is not None:
        if split.shape != (len(embeddings),):
            raise StoreError(f"{path} has {len(embeddings)} embeddings but {split.size} split values")
        unknown = sorted(set(np.unique(split).tolist()) - set(SPLITS))
        if unknown:
            raise StoreError(f"{path} has split values {unknown}; split must be 'query' or 'gallery'")
    return embeddings, labels, split


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("embeddings", "labels") if key not in data.files]
            if missing:
                raise StoreError(f"{path} has no array {missing[0]!r}; an .npz needs 'embeddings' (N, d) and "
                                 "'labels' (N,), optionally 'split'")
            embeddings, labels = data["embeddings"], data["labels"]
            split = data["split"].astype(str) if "split" in data.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise StoreError(f"cannot read {path} as .npz ({exc}); the file is truncated or corrupt, write it again") \
            from None
    if not np.issubdtype(labels.dtype, np.integer):
        raise StoreError(f"{path}: 'labels' must hold integers, got {labels.dtype}")
    if not (np.issubdtype(embeddings.dtype, np.floating) or np.issubdtype(embeddings.dtype, np.integer)):
        raise StoreError(f"{path}: 'embeddings' must hold numbers, got {embeddings.dtype}")
    return embeddings.astype(np.float32), labels.astype(np.int64), split


def _read_parquet(path: Path) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    try:
        names = pq.read_schema(path).names
        missing = [name for name in ("label", "embedding") if name not in names]
        if missing:
            raise StoreError(f"{path} has no column {missing[0]!r}; expected columns 'label' (int), "
                             "'embedding' (list of floats) and optionally 'split'")
        table = pq.read_table(path, columns=[n for n in ("label", "embedding", "split") if n in names])
    except (pa.ArrowException, OSError) as exc:
        raise StoreError(f"cannot read {path} as Parquet ({exc}); the file is truncated or corrupt, "
                         "write it again") from None
    label = table.column("label")
    if not pa.types.is_integer(label.type) or label.null_count:
        raise StoreError(f"{path}: column 'label' must hold integers without nulls, got {label.type}")
    split = None
    if "split" in names:
        column = table.column("split")
        if column.null_count:
            raise StoreError(f"{path}: column 'split' has empty values; every row needs 'query' or 'gallery'")
        split = column.to_numpy(zero_copy_only=False).astype(str)
    return _embedding_matrix(path, table.column("embedding")), label.to_numpy().astype(np.int64), split


def _embedding_matrix(path: Path, column: pa.ChunkedArray) -> np.ndarray:
    """(N, d) float32 from a list / large_list / fixed_size_list column, without a per-row loop."""
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)) or not (
            pa.types.is_floating(column.type.value_type) or pa.types.is_integer(column.type.value_type)):
        raise StoreError(f"{path}: column 'embedding' must be a list of floats, got {column.type}")
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if array.null_count:
        raise StoreError(f"{path}: column 'embedding' has empty rows; every row needs a vector")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise StoreError(f"{path}: embeddings have different lengths ({lengths.min()} to {lengths.max()}); "
                         "every row needs the same dimension")
    values = array.flatten()  # respects slicing; only the rows of this array
    if values.null_count:
        raise StoreError(f"{path}: column 'embedding' contains null numbers")
    dim = int(lengths[0]) if len(lengths) else 0
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(array), dim)


def split_sides(path: Path, data: tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]) -> dict:
    """{'query': (embeddings, labels), 'gallery': (...)} selected by the file's split column."""
    embeddings, labels, split = data
    if split is None:
        raise StoreError(f"{path} has no 'split' column; protocol query-gallery needs split = 'query' or "
                         "'gallery' on every row (or use --protocol leave-one-out)")
    sides = {}
    for side in SPLITS:
        rows = split == side
        if not rows.any():
            raise StoreError(f"{path} has no row with split '{side}'; query-gallery needs both sides")
        sides[side] = (embeddings[rows], labels[rows])
    return sides


def _json_number(value: float) -> Optional[float]:
    """NaN (BC/FC of a single model) becomes null: strict JSON has no NaN."""
    return None if math.isnan(value) else value
