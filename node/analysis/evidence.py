"""Key slices: the slices that drive a study's answer, highest class evidence first."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

KEY_SLICES = 3


def key_slices(
    slice_probabilities: np.ndarray,
    classes: tuple[str, ...],
    predicted: str,
    count: int = KEY_SLICES,
) -> tuple[Mapping, ...]:
    """Positions (into the evaluated slices) of the ``count`` slices with the highest
    probability of the predicted class, with that probability as their evidence."""
    column = classes.index(predicted)
    order = np.argsort(-slice_probabilities[:, column], kind="stable")[:count]
    return tuple(
        {"position": int(i), "class": predicted, "evidence": float(slice_probabilities[i, column])}
        for i in order
    )
