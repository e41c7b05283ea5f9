"""The agreement gate: a runtime serves only when it answers as the bundle's Keras model does.

On the bundle's gate data (:mod:`node.analysis.gate_data`) a runtime must reach, against
Keras FP32:

- top-1 agreement of at least :data:`MIN_AGREEMENT` on the hold-out slices;
- a largest difference of any class probability of at most :data:`MAX_DIFFERENCE` there;
- identical study answers on the test studies: the class the node reports (calibration and
  operating point applied, as :func:`node.analysis.analyze.analyze_instances` does) under each
  aggregation rule, and the out-of-distribution flag of the study score where the bundle has
  the statistics.

And how fast a runtime is: seconds per slice at each batch size, the fastest kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from node.analysis import calibration, ood
from node.analysis.result import RULES

MIN_AGREEMENT = 0.99
MAX_DIFFERENCE = 0.05
BATCH_SIZES = (1, 4, 8, 16, 32)
TIMING_SIDE = 512  # CT slices are 512 x 512: the model's own resize is part of its time

# a runtime: uint8 (N, H, W, 1) in, (probabilities, penultimate features) out
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Answers:
    """A runtime's outputs on the gate data."""

    holdout: np.ndarray  # (N, classes) probabilities of the hold-out slices
    test: np.ndarray  # (M, classes) probabilities of the test studies' slices
    test_features: np.ndarray  # (M, features)


def answers(
    runner: Runner, data, batch_size: int = 16, tick: Callable[[int], None] | None = None
) -> Answers:
    """``runner``'s outputs on ``data`` (a :class:`~node.analysis.gate_data.GateData`);
    ``tick(n)`` after each batch of ``n`` slices."""

    def run(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities, features = [], []
        for start in range(0, len(slices), batch_size):
            batch = np.ascontiguousarray(slices[start : start + batch_size, ..., np.newaxis])
            p, f = runner(batch)
            probabilities.append(np.asarray(p, np.float32))
            features.append(np.asarray(f, np.float32))
            if tick is not None:
                tick(len(batch))
        return np.concatenate(probabilities), np.concatenate(features)

    holdout, _ = run(data.holdout)
    test, test_features = run(data.test_slices)
    return Answers(holdout, test, test_features)


def study_answers(
    answers: Answers, studies: np.ndarray, info, statistics: ood.OodStatistics | None
) -> dict[str, tuple]:
    """Per test study, what the node would report: the class under each rule, and whether
    the study is flagged as unlike the training data (None without statistics)."""
    found = {}
    for key in sorted(set(studies.tolist())):
        rows = studies == key
        slices = calibration.calibrate_slices(answers.test[rows], info)
        classes = tuple(
            calibration.study_answer(slices, info.classes, rule, info)[0] for rule in RULES
        )
        flagged = None
        if statistics is not None:
            distances = ood.slice_distances(
                statistics.means, statistics.precision, answers.test_features[rows]
            )
            flagged = ood.study_score(distances) > statistics.threshold
        found[key] = (classes, flagged)
    return found


def compare(
    reference: Answers, candidate: Answers, data, info, statistics: ood.OodStatistics | None
) -> dict:
    """The gate's figures for ``candidate`` against ``reference`` (Keras FP32) and whether it
    passes: ``passed``, ``agreement``, ``max_diff``, ``studies_identical``, ``studies``,
    ``studies_differing`` and ``reason`` (empty when it passes)."""
    agreement = float(np.mean(reference.holdout.argmax(1) == candidate.holdout.argmax(1)))
    max_diff = float(np.abs(reference.holdout - candidate.holdout).max())
    expected = study_answers(reference, data.test_studies, info, statistics)
    found = study_answers(candidate, data.test_studies, info, statistics)
    differing = sorted(key for key in expected if expected[key] != found[key])
    failures = []
    if not agreement >= MIN_AGREEMENT:
        failures.append(f"top-1 agreement {agreement:.2%} < {MIN_AGREEMENT:.0%}")
    if not max_diff <= MAX_DIFFERENCE:
        failures.append(f"max probability difference {max_diff:.3f} > {MAX_DIFFERENCE}")
    if differing:
        failures.append(f"study answers differ on {len(differing)} of {len(expected)} test studies")
    return {
        "passed": not failures,
        "agreement": round(agreement, 6),
        "max_diff": round(max_diff, 6),
        "studies_identical": not differing,
        "studies": len(expected),
        "studies_differing": len(differing),
        "holdout_slices": len(reference.holdout),
        "reason": "; ".join(failures),
    }


def describe(result: dict) -> str:
    """The gate's figures in one line, as the log and ``ainode models activate`` show them
    (empty for a runtime that could not be made, whose ``reason`` says why)."""
    if "agreement" not in result:
        return ""
    return (
        f"top-1 agreement {result['agreement']:.2%} (gate: >= {MIN_AGREEMENT:.0%}), max "
        f"probability difference {result['max_diff']:.4f} (gate: <= {MAX_DIFFERENCE}), study "
        f"answers the same on {result['studies'] - result['studies_differing']}/"
        f"{result['studies']} test studies; against Keras FP32 on {result['holdout_slices']} "
        "hold-out slices"
    )


def timing_slices(slices: np.ndarray, count: int = max(BATCH_SIZES)) -> np.ndarray:
    """``count`` slices at the side of a CT slice (repeated pixels when smaller: time does not
    depend on what the pixels show), ``(count, side, side, 1)``."""
    chosen = slices[np.arange(count) % len(slices)]
    side = chosen.shape[1]
    if side < TIMING_SIDE:
        factor = -(-TIMING_SIDE // side)
        chosen = chosen.repeat(factor, axis=1).repeat(factor, axis=2)
        chosen = chosen[:, :TIMING_SIDE, :TIMING_SIDE]
    return np.ascontiguousarray(chosen[..., np.newaxis])


def fastest_batch(
    runner: Runner,
    slices: np.ndarray,
    sizes: Sequence[int] = BATCH_SIZES,
    min_seconds: float = 0.3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Seconds per slice of ``runner`` at each batch size and the fastest.

    Each size is run once untimed (a new shape plans its memory), then timed until
    ``min_seconds`` have passed and at least twice; the fastest run counts (other work on the
    host only ever slows a run down). Larger sizes are not tried once two in a row are 20 %
    slower than the best so far.

    Returns
    -------
    dict
        ``batch_size``, ``seconds_per_slice`` and ``by_batch`` (size → seconds per slice).
    """
    by_batch: dict[int, float] = {}
    slower = 0
    for size in sizes:
        batch = slices[:size]
        runner(batch)
        runs, started = [], clock()
        while len(runs) < 2 or clock() - started < min_seconds:
            before = clock()
            runner(batch)
            runs.append((clock() - before) / len(batch))
        by_batch[size] = min(runs)
        slower = slower + 1 if by_batch[size] > 1.2 * min(by_batch.values()) else 0
        if slower == 2:
            break
    best = min(by_batch, key=by_batch.get)
    return {
        "batch_size": best,
        "seconds_per_slice": by_batch[best],
        "by_batch": {str(size): round(value, 6) for size, value in by_batch.items()},
    }
