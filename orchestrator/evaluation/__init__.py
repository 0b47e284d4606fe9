"""Evaluation: ranking and retrieval metrics, compatibility rows, pure formulas."""

from orchestrator.evaluation.retrieval import (  # noqa: F401
    truncate_and_normalize,
    ranking_vectors,
    MAP_TIES,
    MapTies,
    per_query_scores,
    retrieval_scores,
    template_top1,
    cross_modal_recall,
    CompatibilityMatrix,
    BY_BLOCK,
    class_block_top1,
    evaluate_pair,
    compatibility_row,
)
