"""Calibrated probabilities and the operating point: from the model's slice probabilities to
the study answer a radiologist reads.

A bundle of format 2 carries what ``ainode train evaluate`` fitted on the validation split
(``model.json``: ``calibration``, ``operating_point``); a bundle without them is served as it
always was: uncalibrated probabilities, the most probable class.

``calibration`` (temperature scaling, Guo et al. 2017, "On calibration of modern neural
networks"; the model's log-probabilities are its logits)::

    {"method": "temperature",
     "slice": {"temperature": 1.8, "slices": 1200},
     "study": {"temperature": 2.4, "rule": "top-mean", "studies": 36}}

``operating_point`` (the COVID-19 threshold on the calibrated study probability, chosen on
validation studies for a target sensitivity; the test split's figures at that threshold)::

    {"class": "Covid_19", "rule": "top-mean", "threshold": 0.31, "target_sensitivity": 0.95,
     "validation": {"sensitivity": …, "specificity": …, "studies": …, …},
     "test": {"sensitivity": …, "specificity": …, "ppv": …, "true_positives": …, …}}

Study calibration and the operating point hold for studies aggregated with their ``rule``; a
study aggregated otherwise (single pictures given by hand take ``mean``) gets calibrated
slices, the most probable class, and a decision that says why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from node.analysis.model_info import BundleError
from node.analysis.result import RULES, aggregate

METHOD = "temperature"
COVID_CLASS = "Covid_19"
TEMPERATURE_RANGE = (0.01, 100.0)
_FLOOR = 1e-12  # log(0) guard: a probability of exactly 0 is a logit of -27.6


# ---------------------------------------------------------------------------- checking


def _temperature(part: object, where: str) -> float:
    if not isinstance(part, Mapping):
        raise BundleError(f"model.json: calibration.{where} must be a JSON object, got {part!r}")
    value = part.get("temperature")
    low, high = TEMPERATURE_RANGE
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BundleError(
            f"model.json: calibration.{where}.temperature must be a number in {low}..{high}, "
            f"got {value!r}"
        )
    return float(value)


def check_calibration(calibration: Mapping) -> None:
    """Refuse a ``calibration`` object that cannot be applied (BundleError naming the field)."""
    if not calibration:
        return
    if calibration.get("method") != METHOD:
        raise BundleError(
            f"model.json: calibration.method must be {METHOD!r}, got {calibration.get('method')!r}"
        )
    _temperature(calibration.get("slice"), "slice")
    study = calibration.get("study")
    if study is not None:
        _temperature(study, "study")
        if study.get("rule") not in RULES:
            raise BundleError(
                f"model.json: calibration.study.rule must be one of {RULES}, "
                f"got {study.get('rule')!r}"
            )


def check_operating_point(operating_point: Mapping, classes: tuple[str, ...]) -> None:
    """Refuse an ``operating_point`` that cannot be applied (BundleError naming the field)."""
    if not operating_point:
        return
    name = operating_point.get("class")
    if name != COVID_CLASS or name not in classes:
        raise BundleError(
            f"model.json: operating_point.class must be {COVID_CLASS!r} (one of the model's "
            f"classes), got {name!r}"
        )
    if operating_point.get("rule") not in RULES:
        raise BundleError(
            f"model.json: operating_point.rule must be one of {RULES}, "
            f"got {operating_point.get('rule')!r}"
        )
    for key, low in (("threshold", 0.0), ("target_sensitivity", 0.0)):
        value = operating_point.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low < value <= 1:
            raise BundleError(
                f"model.json: operating_point.{key} must be a number in (0, 1], got {value!r}"
            )
    for key in ("validation", "test"):
        if not isinstance(operating_point.get(key), Mapping):
            raise BundleError(f"model.json: operating_point.{key} must be a JSON object")


def check(info) -> None:
    """Refuse a bundle whose calibration or operating point cannot be applied."""
    check_calibration(info.calibration)
    check_operating_point(info.operating_point, info.classes)


# ---------------------------------------------------------------------------- applying


def temperature_scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of ``log(probabilities) / temperature`` per row (1: the rows renormalised)."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), _FLOOR, None))
    logits = logits / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def calibrate_slices(probabilities: np.ndarray, info) -> np.ndarray:
    """Slice probabilities as calibrated by the bundle (unchanged without a calibration)."""
    if info.format_version < 2 or not info.calibration:
        return probabilities
    check_calibration(info.calibration)
    scaled = temperature_scale(probabilities, info.calibration["slice"]["temperature"])
    return scaled.astype(np.asarray(probabilities).dtype, copy=False)


def most_probable(probabilities, classes: tuple[str, ...], among=None) -> str:
    """The most probable class (of ``among``); a tie goes to a disease class before
    ``Normal``, then to the first in class order (as :func:`node.analysis.result.aggregate`)."""
    candidates = [i for i, name in enumerate(classes) if among is None or name in among]
    best = max(probabilities[i] for i in candidates)
    tied = [i for i in candidates if probabilities[i] == best]
    return classes[next((i for i in tied if classes[i] != "Normal"), tied[0])]


def decide_at_threshold(probabilities, classes: tuple[str, ...], threshold: float) -> str:
    """Covid_19 when its probability reaches ``threshold``, else the most probable of the
    other classes (the operating point's rule)."""
    if probabilities[classes.index(COVID_CLASS)] >= threshold:
        return COVID_CLASS
    return most_probable(probabilities, classes, [n for n in classes if n != COVID_CLASS])


def study_answer(
    slice_probabilities: np.ndarray, classes: tuple[str, ...], rule: str, info
) -> tuple[str, tuple[float, ...], tuple[float, ...] | None, Mapping]:
    """The study's class, its (calibrated) probabilities, the probabilities before study
    calibration (None without one) and how the class was decided.

    ``slice_probabilities`` are already calibrated (:func:`calibrate_slices`). With an
    operating point for ``rule``: Covid_19 when its calibrated study probability reaches the
    threshold, else the most probable of the other classes.
    """
    predicted, aggregated = aggregate(slice_probabilities, classes, rule)
    if info.format_version < 2 or not (info.calibration or info.operating_point):
        return predicted, aggregated, None, {"method": "most probable class"}
    check(info)
    probabilities, uncalibrated = aggregated, None
    study = info.calibration.get("study") if info.calibration else None
    notes = []
    if study is not None and study["rule"] == rule:
        scaled = temperature_scale(np.asarray(aggregated), study["temperature"])
        probabilities, uncalibrated = tuple(float(p) for p in scaled), aggregated
    elif study is not None:
        notes.append(f"study calibration is for the {study['rule']} rule, not {rule}")
    decision: dict = {
        "method": "most probable class",
        "calibrated": bool(info.calibration),
        "study_calibrated": uncalibrated is not None,
        "rule": rule,
    }
    point = info.operating_point
    if point and point["rule"] == rule:
        threshold = float(point["threshold"])
        covid = probabilities[classes.index(COVID_CLASS)]
        predicted = decide_at_threshold(probabilities, classes, threshold)
        decision.update(
            {
                "method": "operating point",
                "class": COVID_CLASS,
                "threshold": threshold,
                "target_sensitivity": float(point["target_sensitivity"]),
                "covid_probability": float(covid),
                "validation": dict(point["validation"]),
                "test": dict(point["test"]),
            }
        )
    else:
        if point:
            notes.append(f"the operating point is for the {point['rule']} rule, not {rule}")
        predicted = most_probable(probabilities, classes)
    if notes:
        decision["note"] = "; ".join(notes)
    return predicted, tuple(probabilities), uncalibrated, decision


def describe(decision: Mapping | None) -> str:
    """How the class was decided, in one plain sentence (for the SR and the web pages)."""
    if not decision or decision.get("method") != "operating point":
        text = "The most probable class"
        if decision and decision.get("calibrated"):
            text += " of the calibrated probabilities"
        return text + "."
    test = decision.get("test") or {}
    text = (
        f"Covid_19 is called when its calibrated probability reaches "
        f"{_percent(decision['threshold'])} (operating point chosen on validation studies for "
        f"a sensitivity of {_percent(decision['target_sensitivity'])}); this study: "
        f"{_percent(decision['covid_probability'])}."
    )
    if test.get("sensitivity") is not None:
        text += (
            f" On the held-out test studies at this threshold: sensitivity "
            f"{_percent(test['sensitivity'])} ({test.get('true_positives')}/"
            f"{test.get('positives')}), specificity {_percent(test.get('specificity'))} "
            f"({test.get('true_negatives')}/{test.get('negatives')}), PPV "
            f"{_percent(test.get('ppv'))}."
        )
    return text


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * float(value):.1f} %"
