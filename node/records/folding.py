"""Text matching as the node does it everywhere: case and accents folded, white space
collapsed, so "TÓRAX  simple" and "Tórax Simple" are the same description (the pull's
description filter and the routing rules)."""

from __future__ import annotations

import fnmatch
import unicodedata
from collections.abc import Iterable


def fold(text: str | None) -> str:
    """Case- and accent-folded text with runs of white space collapsed."""
    return " ".join(without_accents(text).casefold().split())


def without_accents(text: str | None) -> str:
    """``text`` with its accents taken off (compatibility decomposition), case kept: what a
    regular expression is folded to (case-folding one would change ``\\S`` into ``\\s``)."""
    if not text:
        return ""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def description_matches(description: str | None, patterns: Iterable[str]) -> bool:
    """Whether a StudyDescription matches any pattern (``*``/``?`` wildcards), folded."""
    folded = fold(description)
    return any(fnmatch.fnmatchcase(folded, fold(pattern)) for pattern in patterns)
