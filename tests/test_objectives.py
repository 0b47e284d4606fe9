"""Objective and constraint names against hand-computed values on a small metrics.json entry."""

import math

import numpy as np
import pytest

from orchestrator.evaluation import metrics as M
from orchestrator.errors import ConfigError
from orchestrator.evaluation.objectives import (Objective, compatibility_margin, min_margin, parse_constraint, parse_name,
                                     table_values)

MATRIX = [[0.50, None, None], [0.55, 0.70, None], [0.48, 0.72, 0.80]]


def entry(matrix=MATRIX, accuracy=(0.9, 0.8, 0.6)):
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix])
    summary = {"AC": M.average_compatibility(values), "AM": M.average_multimodel_accuracy(values),
               "BC": M.backward_compatibility(values), "FC": M.forward_compatibility(values)}
    return {"num_versions": len(matrix), "matrices": {"cmc1": matrix}, "summary": summary,
            "summary_by_metric": {"cmc1": summary}, "accuracy": None if accuracy is None else list(accuracy)}


def value(text, e=None):
    return parse_name(text, "k").value(e or entry(), "cmc1")


def test_margins_by_hand():
    full = np.array([[0.5, 0, 0], [0.55, 0.7, 0], [0.48, 0.72, 0.8]])
    assert compatibility_margin(full, 1, 0) == pytest.approx(0.05)
    assert compatibility_margin(full, 2, 0) == pytest.approx(-0.02)
    assert compatibility_margin(full, 2, 1) == pytest.approx(0.02)
    assert min_margin(full) == pytest.approx(-0.02)
    assert math.isnan(min_margin(np.array([[0.5]])))
    # ECC holds on every pair exactly when the smallest margin is positive (strict criterion)
    assert (min_margin(full) > 0) == bool(M.ecc_matrix(full)[np.tri(3, k=-1, dtype=bool)].all())


def test_names_read_the_entry():
    assert value("AM") == pytest.approx(100 * (0.5 + 0.55 + 0.7 + 0.48 + 0.72 + 0.8) / 6)
    assert value("AC") == pytest.approx(2 / 3)  # (1,0) and (2,1) hold, (2,0) does not
    assert value("M[1][0]") == 0.55 and value("M[-1][0]") == 0.48 and value("M[-1][-1]") == 0.8
    assert value("margin[-1][0]") == pytest.approx(-0.02) and value("margin[1][0]") == pytest.approx(0.05)
    assert value("min_margin") == pytest.approx(-0.02)
    assert value("accuracy") == 0.6 and value("accuracy[0]") == 0.9
    assert value("Avg") == pytest.approx(0.7667, abs=1e-4) and value("PD") == pytest.approx(0.3)


def test_names_a_run_does_not_define_yet_are_nan():
    prefix = entry([[0.5]], accuracy=(0.9,))  # after the first step only
    for text in ("M[1][0]", "margin[-1][-2]", "min_margin", "BC", "accuracy[2]"):
        assert math.isnan(value(text, prefix)), text
    assert value("M[-1][0]", prefix) == 0.5  # relative indexes follow the growing run
    assert math.isnan(value("accuracy", entry(accuracy=None)))


@pytest.mark.parametrize("text", ["AUC", "M[1]", "margin[a][0]", "M[1][0"])
def test_unknown_names_are_rejected_with_the_forms(text):
    with pytest.raises(ConfigError) as err:
        parse_name(text, "sweep.objective.metric")
    assert err.value.key == "sweep.objective.metric" and "margin[i][j]" in str(err.value)


@pytest.mark.parametrize("text, versions", [("M[3][0]", 3), ("M[0][1]", 3), ("margin[1][1]", 3), ("BC", 1),
                                            ("M[-4][0]", 3)])
def test_names_a_finished_run_cannot_define_fail_early(text, versions):
    with pytest.raises(ConfigError) as err:
        parse_name(text, "k").check_defined(versions, "sweep.objective.metric")
    assert err.value.key == "sweep.objective.metric"


def test_constraints():
    ecc = parse_constraint("AC >= 1", "sweep.constraints.0")
    assert ecc.text == "AC >= 1" and not ecc.holds(2 / 3) and ecc.holds(1.0)
    assert parse_constraint("margin[-1][0]>0", "k").holds(math.nan)  # undefined yet: no violation
    for bad in ("AC => 1", "AC >= one", "AC"):
        with pytest.raises(ConfigError) as err:
            parse_constraint(bad, "sweep.constraints.2")
        assert err.value.key == "sweep.constraints.2"


def test_objective_is_the_mean_over_seeds_and_marks_violations():
    other = entry([[0.60, None, None], [0.65, 0.70, None], [0.75, 0.76, 0.80]])  # ECC on every pair
    objective = Objective(parse_name("M[-1][0]", "k"), "max", "bct", "cmc1",
                          (parse_constraint("AC >= 1", "k"), parse_constraint("min_margin > 0", "k")))
    both = objective.evaluate([entry(), other])
    assert both.value == pytest.approx((0.48 + 0.75) / 2)
    # constraints read the mean too: AC (2/3 + 1) / 2 < 1 fails; min_margin (-0.02 + 0.05) / 2 > 0 holds
    assert not both.feasible and both.violations == ("AC >= 1 (0.8333)",)
    assert objective.evaluate([other]).feasible


def test_table_values_skip_accuracy_without_a_classifier():
    assert set(table_values([entry()], "cmc1")) == {"AC", "AM", "BC", "FC", "M[-1][-1]", "min_margin", "accuracy", "Avg"}
    assert "accuracy" not in table_values([entry(accuracy=None)], "cmc1")
    with pytest.raises(ConfigError, match="cmc5"):
        parse_name("AM", "k").value(entry(), "cmc5")


def test_flagged_counts_the_versions_the_health_check_flags_and_gates_a_sweep():
    health = {"versions": [{"warning": None}, {"warning": True}, {"warning": False}]}
    assert value("flagged", {**entry(), "health": health}) == 1.0
    healthy = {"versions": [{"warning": None}, {"warning": False}, {"warning": False}]}
    assert value("flagged", {**entry(), "health": healthy}) == 0.0
    assert math.isnan(value("flagged"))  # no health table (no classifier): undefined, not a violation
    gate = parse_constraint("flagged <= 0", "sweep.constraints.0")
    assert not gate.holds(1.0) and gate.holds(0.0) and gate.holds(float("nan"))
