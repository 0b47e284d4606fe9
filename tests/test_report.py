import csv
import json
from pathlib import Path

import pytest

from orchestrator.errors import RunError
from orchestrator.reporting.report import format_summary_table, render_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def method_entry(name, matrix, ecc, summary, accuracy=None, map_summary=None):
    return {"method": name, "params": {"alpha": 1.0}, "num_versions": len(matrix),
            "matrices": {"cmc1": matrix, "map": [[None if v is None else v / 2 for v in row] for row in matrix]},
            "summary": summary, "summary_by_metric": {"cmc1": summary, "map": map_summary or summary},
            "ecc": {"cmc1": ecc, "map": ecc}, "accuracy": accuracy}


COMPATIBLE = [[0.51, None, None], [0.55, 0.70, None], [0.60, 0.72, 0.80]]
COMPATIBLE_ECC = [[None, None, None], [True, None, None], [True, True, None]]
BROKEN = [[0.50, None, None], [0.40, 0.66, None], [0.45, 0.60, 0.75]]
BROKEN_ECC = [[None, None, None], [False, None, None], [False, False, None]]

METRICS = {
    "schema_version": 1, "experiment": "unit-test", "seed": 3, "config_digest": "abc123",
    "protocol": "leave-one-out", "primary": "cmc1",
    "methods": {
        "bct": method_entry("bct", COMPATIBLE, COMPATIBLE_ECC,
                            {"AC": 1.0, "AM": 64.667, "BC": 0.1, "FC": 0.2, "ECC_every_pair": True},
                            accuracy=[0.9, 0.8, 0.7],
                            map_summary={"AC": 2 / 3, "AM": 32.333, "BC": 0.05, "FC": 0.1, "ECC_every_pair": False}),
        "independent": method_entry("independent", BROKEN, BROKEN_ECC,
                                    {"AC": 0.0, "AM": 56.0, "BC": -0.2, "FC": -0.1}),
        "hoc d/simplex": method_entry("stationary", COMPATIBLE, COMPATIBLE_ECC,
                                      {"AC": 1.0, "AM": 64.667, "BC": 0.1, "FC": 0.2}),
    },
    "seeds": {"values": [0, 1, 2], "per_seed": {}, "mean": {"bct": {"AC": 0.9, "AM": 63.0}},
              "std": {"bct": {"AC": 0.05, "AM": 1.25}}},
}


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    return tmp_path


def test_render_writes_every_file(run_dir):
    report = render_report(run_dir)
    assert report == str(run_dir / "report.md")
    pngs = ["heatmaps.png", "accuracy.png", "heatmap_bct.png", "heatmap_independent.png", "heatmap_hoc_d_simplex.png"]
    for name in pngs:
        assert (run_dir / name).read_bytes().startswith(PNG_SIGNATURE), name
    for method in ("bct", "independent", "hoc_d_simplex"):
        for metric in ("cmc1", "map"):
            assert (run_dir / f"matrix_{method}_{metric}.csv").is_file()


def test_report_mentions_every_method_summary_pairs_and_seeds(run_dir):
    text = Path(render_report(run_dir)).read_text()
    for key in METRICS["methods"]:
        assert f"## {key}" in text
    # verdicts on every metric, side by side: AC, AM, ECC on every pair of cmc1 (primary) then map
    assert "| method | CMC top-1 (primary) AC | CMC top-1 (primary) AM | CMC top-1 (primary) ECC | mAP AC |" in text
    assert "| bct | 1.000 | 64.667 | yes | 0.667 | 32.333 | no |" in text
    assert "| independent | 0.000 | 56.000 | no | 0.000 | 56.000 | no |" in text  # flags of a file without the key
    assert "| 1 vs 0 | cmc1 | 0.500 | 0.400 | 0.660 | no |" in text  # old/old, new/old, new/new, ECC
    assert "| 2 vs 0 | cmc1 | 0.510 | 0.600 | 0.800 | yes |" in text  # (last, first)
    assert "0.900 ± 0.050" in text and "leave-one-out" in text
    assert "![heatmaps.png](heatmaps.png)" in text and "(heatmap_independent.png)" in text


def test_matrix_csv_round_trip(run_dir):
    render_report(run_dir)
    with (run_dir / "matrix_bct_cmc1.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["query\\gallery", "0", "1", "2"]
    assert [int(row[0]) for row in rows[1:]] == [0, 1, 2]
    assert [[float(v) if v else None for v in row[1:]] for row in rows[1:]] == COMPATIBLE


def test_minimal_metrics_render_without_optional_keys(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"methods": {"m": {"matrices": {"cmc1": [[0.5]]}}}}))
    text = Path(render_report(tmp_path)).read_text()
    assert "| m | – | – | n/a |" in text
    assert not (tmp_path / "accuracy.png").exists()


def test_summary_table_for_the_cli_shows_every_metric_primary_first():
    lines = format_summary_table(METRICS).splitlines()
    assert "new/old > old/old (ties fail)" in lines[1]
    assert lines[2].split() == ["CMC", "top-1", "(primary)", "mAP"]
    assert lines[3].split() == ["method", "AC", "AM", "ECC", "AC", "AM", "ECC"]
    assert lines[4].split() == ["bct", "1.000", "64.667", "yes", "0.667", "32.333", "no"]
    assert lines[5].split() == ["independent", "0.000", "56.000", "no", "0.000", "56.000", "no"]
    assert len({len(line) for line in lines[3:]}) == 1  # aligned
    assert lines[2].index("mAP") == lines[3].index("ECC") + len("ECC") + 4  # each title above its own group
    reordered = {**METRICS, "primary": "map", "ties": "pass"}
    lines = format_summary_table(reordered).splitlines()
    assert "new/old ≥ old/old (ties pass)" in lines[1]
    assert lines[2].split() == ["mAP", "(primary)", "CMC", "top-1"]
    assert lines[4].split() == ["bct", "0.667", "32.333", "no", "1.000", "64.667", "yes"]


def test_missing_metrics_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        render_report(tmp_path)


@pytest.mark.parametrize("ties", ["fail", "pass"])
def test_ties_decide_every_verdict_of_metrics_json_and_the_report(tmp_path, ties):
    from helpers import config_under
    from orchestrator.storage import runfiles
    from orchestrator.engine.driver import assemble_metrics

    # cmc1: (1,0) ties with the self-test 0.5, (2,0) and (2,1) beat theirs; map: every cross-test beats.
    # By hand: ties fail -> AC(cmc1) = 2/3, ECC not on every pair; ties pass -> AC = 1, on every pair.
    rows = [{"cmc1": [0.5], "map": [0.3]}, {"cmc1": [0.5, 0.7], "map": [0.35, 0.4]},
            {"cmc1": [0.6, 0.8, 0.9], "map": [0.4, 0.5, 0.6]}]
    cfg = config_under(tmp_path, f"evaluation.ties={ties}", "evaluation.primary=map", "methods=[{name: independent}]")
    run_dir = tmp_path / "run"
    for version, row in enumerate(rows):
        runfiles.write_row(run_dir, "independent", version, row)
    runfiles.storage(run_dir).write_json(f"{runfiles.version_key('independent', 0)}/meta.json", {"params": {}})
    metrics = assemble_metrics(cfg, run_dir, 3, cfg.data.num_classes)
    entry = metrics["methods"]["independent"]
    tied = ties == "pass"
    assert metrics["ties"] == ties and entry["ecc"]["cmc1"][1][0] is tied
    assert entry["summary_by_metric"]["cmc1"]["AC"] == pytest.approx(1.0 if tied else 2 / 3)
    assert entry["summary_by_metric"]["cmc1"]["ECC_every_pair"] is tied
    assert entry["summary_by_metric"]["map"]["ECC_every_pair"] is True
    assert set(entry["summary"]) == {"AC", "AM", "BC", "FC"} and entry["summary"]["AC"] == 1.0  # primary: map
    runfiles.storage(run_dir).write_json("metrics.json", metrics)
    text = Path(render_report(run_dir)).read_text()
    rule = "new/old ≥ old/old" if tied else "new/old > old/old"
    assert f"ECC: {rule}" in text
    assert f"| 1 vs 0 | cmc1 | 0.500 | 0.500 | 0.700 | {'yes' if tied else 'no'} |" in text
    # AM: map (.3 + .35 + .4 + .4 + .5 + .6) / 6 = 42.5 %, cmc1 (.5 + .5 + .7 + .6 + .8 + .9) / 6 = 66.667 %
    assert f"| independent | 1.000 | 42.500 | yes | {'1.000' if tied else '0.667'} | 66.667 | {'yes' if tied else 'no'} |" in text


def test_negative_flips_are_reported_per_pair_with_their_spread_over_seeds(tmp_path):
    metrics = json.loads(json.dumps(METRICS))
    metrics["methods"]["bct"]["negative_flip_rate"] = {
        "new_old": [[None, None, None], [0.05, None, None], [0.125, 0.02, None]],
        "new_new": [[None, None, None], [0.04, None, None], [0.1, 0.01, None]]}
    metrics["methods_std"] = {"bct": {"negative_flip_rate": {
        "new_old": [[None, None, None], [0.01, None, None], [0.025, 0.005, None]],
        "new_new": [[None] * 3] * 3}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    text = Path(render_report(tmp_path)).read_text()
    assert "## Negative flips (%)" in text and "| independent |" not in text.split("## Negative flips")[1].split("##")[0]
    assert "| bct | 1 vs 0 | 0.510 | 5.00 ± 1.00 | 4.00 |" in text
    assert "| bct | 2 vs 1 | 0.700 | 2.00 ± 0.50 | 1.00 |" in text
    assert "| bct | 2 vs 0 | 0.510 | 12.50 ± 2.50 | 10.00 |" in text


def gate_entry(new, old, cmc1, flips, compatible, **extra):
    """A metrics.json ``gate`` pair: (estimate, low, high) of new/old - old/old top-1 (mAP at half), flips."""
    interval = lambda e, lo, hi: {"estimate": e, "low": lo, "high": hi}  # noqa: E731
    return {"new_version": new, "old_version": old, "confidence": 0.95, "resamples": 1000, "seed": 0, "ties": "fail",
            **extra, "queries": 40, "difference": {"cmc1": interval(*cmc1), "map": interval(*(v / 2 for v in cmc1))},
            "negative_flip_rate": {"new_old": interval(*flips), "new_new": interval(0.0, 0.0, 0.0)},
            "ecc": {"cmc1": compatible, "map": compatible}, "compatible": compatible}


def test_the_gate_of_every_upgrade_with_its_intervals_and_over_seeds(tmp_path):
    metrics = json.loads(json.dumps(METRICS))
    del metrics["seeds"]
    metrics["methods"]["bct"]["gate"] = [gate_entry(1, 0, (0.05, 0.025, 0.075), (0.025, 0.0, 0.05), True),
                                         gate_entry(2, 1, (0.0, -0.05, 0.05), (0.125, 0.05, 0.2), False)]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    text = Path(render_report(tmp_path)).read_text()
    section = text.split("## Release gate of every upgrade")[1].split("\n## ")[0]
    assert "(1000 resamples, seed 0)" in section and "lower bound is above 0" in section and "ties fail" in section
    assert ("| method | new vs old | new/old − old/old CMC top-1 [95 %] | new/old − old/old mAP [95 %] | "
            "NFR new/old % [95 %] | verdict |") in section
    assert "| bct | 1 vs 0 | +0.0500 [+0.0250, +0.0750] | +0.0250 [+0.0125, +0.0375] | 2.50 [0.00, 5.00] | compatible |" in section
    assert ("| bct | 2 vs 1 | +0.0000 [-0.0500, +0.0500] | +0.0000 [-0.0250, +0.0250] | 12.50 [5.00, 20.00] | "
            "**not compatible** |") in section
    assert "| independent |" not in section

    over_seeds = json.loads(json.dumps(METRICS))
    by_seed = {"3": gate_entry(1, 0, (0.05, 0.025, 0.075), (0.025, 0.0, 0.05), True),
               "4": gate_entry(1, 0, (0.0, -0.05, 0.05), (0.125, 0.05, 0.2), False)}
    over_seeds["methods"]["bct"]["gate"] = [{**{k: by_seed["3"][k] for k in ("new_version", "old_version", "confidence",
                                                                             "resamples", "seed", "ties")},
                                             "by_seed": by_seed, "compatible_seeds": 1}]
    (tmp_path / "metrics.json").write_text(json.dumps(over_seeds))
    section = Path(render_report(tmp_path)).read_text().split("## Release gate of every upgrade")[1].split("\n## ")[0]
    assert "compat check" in section and "on RUN/seed-N" in section
    assert "| bct | 1 vs 0 | seed 3 | +0.0500 [+0.0250, +0.0750] |" in section
    assert "| bct | 1 vs 0 | seed 4 | +0.0000 [-0.0500, +0.0500] |" in section
    assert "| bct | 1 vs 0 | all |  |  |  | **1/2 seeds compatible** |" in section
