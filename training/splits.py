"""Train / validation / test splits made by patient, so no patient is on both sides.

The seed paper split images at random; with many slices per patient that puts near-identical
neighbouring slices of one patient in train and test and inflates every test figure.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Collection

from node.analysis.result import CLASSES
from training.samples import SPLITS, Sample


class LeakError(ValueError):
    """A patient key is in more than one split."""


def exclude_patients(
    samples: list[Sample], keys: Collection[str]
) -> tuple[list[Sample], list[Sample]]:
    """``(kept, excluded)``: the samples whose patient key is not in ``keys``, and the rest.

    For patients that must stay out of every split, e.g. those of a public set a model is
    later evaluated on (COVIDx CT-3 contains COVID-CT-MD). Raises ValueError when nothing is
    left.
    """
    keys = set(keys)
    kept = [s for s in samples if s.patient not in keys]
    excluded = [s for s in samples if s.patient in keys]
    if samples and not kept:
        patients = len({s.patient for s in excluded})
        raise ValueError(
            f"excluding {len(keys)} patient key(s) leaves no images: all {len(samples)} "
            f"image(s) of {patients} patient(s) are excluded"
        )
    return kept, excluded


def split_by_patient(
    samples: list[Sample], val: float = 0.15, test: float = 0.15, seed: int = 0
) -> list[Sample]:
    """Assign every sample a split so that each patient key is in exactly one split.

    Parameters
    ----------
    samples
        Samples that already have a split (COVIDx's official ones) keep it; the other samples
        of such a patient join that split.
    val, test
        Fractions of the remaining patients, drawn per class (a patient's class is the
        majority label of its samples, ties in :data:`~node.result.CLASSES` order) so every
        class reaches every split when it has at least three patients.
    seed
        The same samples and seed always give the same splits.

    Returns
    -------
    list[Sample]
        The samples in their input order, each with its split set.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val={val} and test={test} must be fractions that leave some train")
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_patient[sample.patient].append(sample)
    chosen = {p: _given_split(group) for p, group in by_patient.items()}
    free = sorted(p for p, split in chosen.items() if split is None)
    by_class: dict[str, list[str]] = defaultdict(list)
    for patient in free:
        by_class[_majority_class(by_patient[patient])].append(patient)
    rng = random.Random(seed)
    for label in CLASSES:
        patients = by_class[label]
        rng.shuffle(patients)
        n_train, n_val, _ = _allocate(len(patients), val, test)
        for i, patient in enumerate(patients):
            chosen[patient] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return [s if s.split is not None else s.with_split(chosen[s.patient]) for s in samples]


def _given_split(group: list[Sample]) -> str | None:
    """The split a patient already has (its most common one if its samples disagree)."""
    given = Counter(s.split for s in group if s.split is not None)
    if not given:
        return None
    return max(SPLITS, key=lambda split: (given[split], -SPLITS.index(split)))


def _majority_class(group: list[Sample]) -> str:
    """The most common label of one patient's samples; ties go to the first in CLASSES."""
    counts = Counter(s.label for s in group)
    return max(CLASSES, key=lambda label: (counts[label], -CLASSES.index(label)))


def _allocate(n: int, val: float, test: float) -> tuple[int, int, int]:
    """How many of ``n`` patients go to train, val and test.

    Rounded shares, but one patient each for test (from two patients) and val (from three)
    when their fraction is not zero, and always at least one for train.
    """
    n_test = int(n * test + 0.5)
    n_val = int(n * val + 0.5)
    if test > 0 and n_test == 0 and n >= 2:
        n_test = 1
    if val > 0 and n_val == 0 and n >= 3:
        n_val = 1
    while n > 0 and n_val + n_test >= n:
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def check_no_leak(samples: list[Sample]) -> None:
    """Raise :class:`LeakError` naming a patient whose samples are in two or more splits."""
    splits: dict[str, set[str]] = defaultdict(set)
    for sample in samples:
        if sample.split is not None:
            splits[sample.patient].add(sample.split)
    leaking = sorted(patient for patient, found in splits.items() if len(found) > 1)
    if leaking:
        first = leaking[0]
        raise LeakError(
            f"patient {first!r} is in splits {', '.join(sorted(splits[first]))}"
            f" ({len(leaking)} leaking patient(s) in all)"
        )


def split_counts(samples: list[Sample]) -> dict[str | None, dict[str, int]]:
    """Images per split and class: ``{split: {class: n}}``, every split and class listed.

    Samples without a split are counted under ``None`` (present only when there are some).
    """
    counts: dict[str | None, dict[str, int]] = {
        split: dict.fromkeys(CLASSES, 0) for split in SPLITS
    }
    for sample in samples:
        counts.setdefault(sample.split, dict.fromkeys(CLASSES, 0))[sample.label] += 1
    return counts
