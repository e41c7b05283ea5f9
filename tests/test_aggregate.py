"""node.analysis.result.aggregate against vectors worked out by hand (the arithmetic is in the
comments), never against itself: mean, top-mean, the Normal floor, ties, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from node.analysis.result import aggregate

CLASSES = ("Covid_19", "Normal", "Pneumonia")

# Eight slices: two with a clear COVID finding, two with some pneumonia, four normal.
EIGHT = [
    [0.9, 0.05, 0.05],
    [0.7, 0.2, 0.1],
    [0.1, 0.6, 0.3],
    [0.1, 0.4, 0.5],
    [0.05, 0.9, 0.05],
    [0.05, 0.9, 0.05],
    [0.0, 1.0, 0.0],
    [0.0, 1.0, 0.0],
]


def test_mean_is_the_mean_of_each_class_over_the_slices():
    # Covid_19  (0.9 + 0.7 + 0.1 + 0.1 + 0.05 + 0.05 + 0 + 0) / 8 = 1.9 / 8  = 0.2375
    # Normal    (0.05 + 0.2 + 0.6 + 0.4 + 0.9 + 0.9 + 1 + 1) / 8 = 5.05 / 8 = 0.63125
    # Pneumonia (0.05 + 0.1 + 0.3 + 0.5 + 0.05 + 0.05 + 0 + 0) / 8 = 1.05 / 8 = 0.13125
    # they sum to 1, so normalising changes nothing
    predicted, probabilities = aggregate(np.array(EIGHT), CLASSES, "mean")
    assert predicted == "Normal"
    assert probabilities == pytest.approx((0.2375, 0.63125, 0.13125), abs=1e-12)


def test_top_mean_takes_the_top_quarter_per_class_and_normal_is_what_is_left():
    # k = ceil(0.25 × 8) = 2 slices per class, each class on its own:
    # Covid_19  top 2: 0.9, 0.7 -> 0.8
    # Pneumonia top 2: 0.5, 0.3 -> 0.4
    # Normal    = 1 - max(0.8, 0.4) = 0.2 (its own top 2, 1.0 and 1.0, are not used)
    # sum 1.4 -> (0.8 / 1.4, 0.2 / 1.4, 0.4 / 1.4) = (4/7, 1/7, 2/7)
    predicted, probabilities = aggregate(np.array(EIGHT), CLASSES, "top-mean")
    assert predicted == "Covid_19"
    assert probabilities == pytest.approx((4 / 7, 1 / 7, 2 / 7), abs=1e-12)


def test_top_mean_of_five_slices_rounds_the_quarter_up():
    # k = ceil(0.25 × 5) = ceil(1.25) = 2
    # Covid_19  column 0.2, 0.1, 0.0, 0.0, 0.0 -> top 2 mean (0.2 + 0.1) / 2 = 0.15
    # Pneumonia column 0.6, 0.2, 0.1, 0.0, 0.0 -> top 2 mean (0.6 + 0.2) / 2 = 0.4
    # Normal = 1 - 0.4 = 0.6; sum 0.15 + 0.6 + 0.4 = 1.15
    rows = [
        [0.2, 0.2, 0.6],
        [0.1, 0.7, 0.2],
        [0.0, 0.9, 0.1],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
    ]
    predicted, probabilities = aggregate(np.array(rows), CLASSES)
    assert predicted == "Normal"
    assert probabilities == pytest.approx((0.15 / 1.15, 0.6 / 1.15, 0.4 / 1.15), abs=1e-12)


def test_one_slice_is_its_own_top_quarter():
    # k = max(1, ceil(0.25)) = 1: Covid_19 0.3, Pneumonia 0.3, Normal = 1 - 0.3 = 0.7
    # (the slice's own Normal, 0.4, is replaced); sum 1.3
    predicted, probabilities = aggregate(np.array([[0.3, 0.4, 0.3]]), CLASSES)
    assert predicted == "Normal"
    assert probabilities == pytest.approx((0.3 / 1.3, 0.7 / 1.3, 0.3 / 1.3), abs=1e-12)


def test_the_top_count_is_not_thrown_off_by_floating_point():
    """0.56 × 25 is exactly 14, but 14.000000000000002 in floating point: ceil made it 15."""
    # 14 slices [0.6, 0.4, 0] and 11 slices [0, 1, 0]; k = 14
    # Covid_19 top 14: all 0.6 -> 0.6   (k = 15 would give 14 × 0.6 / 15 = 0.56)
    # Pneumonia 0; Normal = 1 - 0.6 = 0.4; sum 1
    rows = [[0.6, 0.4, 0.0]] * 14 + [[0.0, 1.0, 0.0]] * 11
    _predicted, probabilities = aggregate(np.array(rows), CLASSES, top_fraction=0.56)
    assert probabilities == pytest.approx((0.6, 0.4, 0.0), abs=1e-12)


def test_normal_is_floored_at_zero():
    # k = ceil(0.25 × 4) = 1
    # Covid_19 top 1: 1.0; Pneumonia top 1: 0.3; Normal = max(0, 1 - 1.0) = 0
    # sum 1.3 -> (1 / 1.3, 0, 0.3 / 1.3)
    rows = [[1.0, 0.0, 0.0], [0.0, 0.7, 0.3], [0.0, 0.8, 0.2], [0.0, 1.0, 0.0]]
    predicted, probabilities = aggregate(np.array(rows), CLASSES)
    assert predicted == "Covid_19"
    assert probabilities == pytest.approx((1 / 1.3, 0.0, 0.3 / 1.3), abs=1e-12)
    # Scores above 1 (a model without a softmax): 1 - 1.25 = -0.25 floors at 0, not below
    # Covid_19 1.25, Pneumonia 0.25, Normal 0; sum 1.5
    rows = [[1.25, 0.0, 0.0], [0.0, 0.75, 0.25], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    _predicted, probabilities = aggregate(np.array(rows), CLASSES)
    assert probabilities == pytest.approx((1.25 / 1.5, 0.0, 0.25 / 1.5), abs=1e-12)


def test_without_a_normal_class_top_mean_only_normalises():
    # k = 1: A top 1 = 0.9, B top 1 = 0.8; sum 1.7
    rows = [[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]]
    predicted, probabilities = aggregate(np.array(rows), ("A", "B"))
    assert predicted == "A"
    assert probabilities == pytest.approx((0.9 / 1.7, 0.8 / 1.7), abs=1e-12)


def test_a_tie_between_normal_and_a_disease_goes_to_the_disease_in_any_class_order():
    # k = 1: Covid_19 top 0.2, Pneumonia top 0.5, Normal = 1 - 0.5 = 0.5; sum 1.2
    # -> (0.2 / 1.2, 0.5 / 1.2, 0.5 / 1.2): Normal and Pneumonia tie at 5/12.
    # Class order put Normal (index 1) before Pneumonia (index 2): the study was "Normal".
    rows = [[0.1, 0.4, 0.5], [0.2, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    predicted, probabilities = aggregate(np.array(rows), CLASSES)
    assert probabilities == pytest.approx((1 / 6, 5 / 12, 5 / 12), abs=1e-12)
    assert predicted == "Pneumonia"
    # the mean of one slice is itself: Normal 0.5 and Covid_19 0.5 tie, whichever comes first
    normal_first = ("Normal", "Covid_19", "Pneumonia")
    assert aggregate(np.array([[0.5, 0.5, 0.0]]), normal_first, "mean")[0] == "Covid_19"
    assert aggregate(np.array([[0.5, 0.5, 0.0]]), CLASSES, "mean")[0] == "Covid_19"


def test_a_tie_between_diseases_goes_to_the_first_in_class_order():
    # mean of one slice [0.4, 0.2, 0.4] is itself: Covid_19 and Pneumonia tie at 0.4
    assert aggregate(np.array([[0.4, 0.2, 0.4]]), CLASSES, "mean")[0] == "Covid_19"
    swapped = ("Pneumonia", "Normal", "Covid_19")
    assert aggregate(np.array([[0.4, 0.2, 0.4]]), swapped, "mean")[0] == "Pneumonia"


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([[0.5, 0.5]], {}, r"need \(slices, 3\) probabilities, got \(1, 2\)"),
        (np.zeros((0, 3)), {}, r"need \(slices, 3\) probabilities, got \(0, 3\)"),
        ([[np.nan, 0.5, 0.5]], {}, "must be finite and >= 0"),
        ([[-0.1, 0.6, 0.5]], {}, "must be finite and >= 0"),
        ([[0.0, 0.0, 0.0]], {"rule": "mean"}, "all 0"),
        ([[0.2, 0.3, 0.5]], {"rule": "median"}, "rule must be one of"),
        ([[0.2, 0.3, 0.5]], {"top_fraction": 0}, r"top_fraction must be in \(0, 1\]"),
    ],
    ids=["columns", "no-slices", "nan", "negative", "all-zero", "rule", "fraction"],
)
def test_bad_input_is_refused_naming_what_is_wrong(rows, kwargs, message):
    """A NaN from a broken model used to come out as the first class, with NaN probabilities."""
    with pytest.raises(ValueError, match=message):
        aggregate(np.array(rows, dtype=float), CLASSES, **kwargs)
