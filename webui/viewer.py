"""The study viewer's slices: which series is shown, in which order, and one slice as a PNG.

The viewer shows the series inference evaluates (:func:`node.analysis.analyze.eligible_series`, or
the series of the latest result's slices), head first, one entry per frame. Building that
list reads every instance header, so it is kept per study until the study or its result
changes. Store keys come from the database only, never from a request.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.analysis import gradcam, imaging
from node.analysis.analyze import AnalysisError, AnalysisOptions, eligible_series
from node.records import routing
from node.records.db import Analysis, Instance, Series, Study
from node.runtime import Node
from node.workflow.retention import removed_reason

HU_LIMIT = 32768.0  # beyond any stored CT value (16-bit signed)
WINDOW_CHOICES = ("lung", "mediastinum", "custom")
STRIP_CLASSES = ("Covid_19", "Pneumonia")
CACHED_STUDIES = 16
HEATMAP_SIZE = 256  # the overlay's pixels; the page stretches it over the slice


@dataclass(frozen=True)
class ViewerSlice:
    """One displayed slice: a frame (0-based) of a stored instance."""

    sop_instance_uid: str
    store_key: str
    frame: int
    multi_frame: bool

    @property
    def prediction_key(self) -> tuple[str, int | None]:
        """How a SlicePrediction names this slice (frame None for single-frame instances)."""
        return self.sop_instance_uid, self.frame if self.multi_frame else None


@dataclass(frozen=True)
class SliceList:
    """The slices a study's viewer shows, head first; ``problem`` says why there are none."""

    slices: tuple[ViewerSlice, ...]
    version: str
    problem: str | None = None


class SliceListCache:
    """The last few studies' slice lists, keyed by what would change them."""

    def __init__(self, size: int = CACHED_STUDIES) -> None:
        self._entries: OrderedDict[tuple, SliceList] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: tuple) -> SliceList | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple, value: SliceList) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


def slice_list(
    node: Node, session: Session, study: Study, analysis: Analysis | None, cache: SliceListCache
) -> SliceList:
    """The viewer's slices of ``study`` (cached until new instances or a new result)."""
    if study.pixels_removed_at is not None:  # the files keep their headers only
        return SliceList((), "removed", removed_reason(study.pixels_removed_at))
    key = (
        study.id,
        study.instance_count,
        study.last_received_at.isoformat(),
        analysis.id if analysis is not None else None,
    )
    found = cache.get(key)
    if found is None:
        version = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
        found = _build_slice_list(node, session, study.id, analysis, version)
        if found.problem is None:  # a file unreadable now may be readable on the next look
            cache.put(key, found)
    return found


def _build_slice_list(
    node: Node, session: Session, study_id: int, analysis: Analysis | None, version: str
) -> SliceList:
    query = select(Instance.sop_instance_uid, Instance.store_key).join(
        Series, Instance.series_id == Series.id
    )
    evaluated = _evaluated_series_id(session, analysis)
    if evaluated is not None:
        query = query.where(Series.id == evaluated)
    else:
        query = query.where(Series.study_id == study_id)
    keys = dict(session.execute(query.order_by(Instance.id)).all())
    if not keys:
        return SliceList((), version, "no instances stored")
    try:
        choose = routing.series_chooser(routing.load_rules(session, routing.SERIES))
        paths = [node.store.path(key) for key in keys.values()]
        datasets, _skipped = eligible_series(paths, choose=choose)
    except AnalysisError as exc:
        return SliceList((), version, str(exc))
    except OSError as exc:
        return SliceList((), version, f"cannot read the stored instances: {exc.strerror or exc}")
    limits = AnalysisOptions.from_settings(node.settings).limits
    slices = []
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        try:  # a header may claim billions of frames: not one entry each
            imaging.check_decode_size(ds, limits)
            frames = int(ds.get("NumberOfFrames") or 1)
        except imaging.ImagingError:
            frames = 1  # one entry, whose image answers why it cannot be shown
        slices.extend(ViewerSlice(uid, keys[uid], frame, frames > 1) for frame in range(frames))
    return SliceList(tuple(slices), version)


def _evaluated_series_id(session: Session, analysis: Analysis | None) -> int | None:
    """The series the result's slices come from (None without a result)."""
    if analysis is None or not analysis.slices:
        return None
    return session.scalars(
        select(Instance.series_id).where(
            Instance.sop_instance_uid == analysis.slices[0].sop_instance_uid
        )
    ).first()


def strip_values(slices: SliceList, analysis: Analysis | None) -> list[list[float] | None]:
    """Per displayed slice its [Covid_19, Pneumonia] probabilities, None where not evaluated."""
    if analysis is None:
        return [None] * len(slices.slices)
    by_slice = {(row.sop_instance_uid, row.frame): row.probabilities for row in analysis.slices}
    values: list[list[float] | None] = []
    for item in slices.slices:
        probabilities = by_slice.get(item.prediction_key)
        values.append(
            None
            if probabilities is None
            else [round(float(probabilities.get(name, 0.0)), 4) for name in STRIP_CLASSES]
        )
    return values


def key_slice_maps(slices: SliceList, analysis: Analysis | None) -> dict[int, dict]:
    """Per displayed slice index, the result's key slice there: ``rank`` (1 = the strongest
    evidence), ``class``, ``evidence`` and its stored Grad-CAM ``heatmap`` (None without)."""
    if analysis is None:
        return {}
    stored = (analysis.assessment or {}).get("key_slices") or []
    by_position = {row.position: (row.sop_instance_uid, row.frame) for row in analysis.slices}
    shown = {item.prediction_key: n for n, item in enumerate(slices.slices)}
    found: dict[int, dict] = {}
    for rank, key in enumerate(stored, start=1):
        n = shown.get(by_position.get(key.get("position")))
        if n is not None and n not in found:
            found[n] = {**key, "rank": rank, "heatmap": key.get("heatmap")}
    return found


def render_heatmap(stored: Mapping, size: int = HEATMAP_SIZE) -> bytes:
    """A stored Grad-CAM map as a colour PNG overlay (transparent where there is no
    evidence); ``ValueError`` when the stored map is damaged."""
    return gradcam.png_bytes(gradcam.overlay_rgba(gradcam.decode(stored), (size, size)))


def window_from_args(args: Mapping[str, str]) -> imaging.Window:
    """The display window a request asks for (``window`` preset, or custom C/W in HU).

    Raises
    ------
    ValueError
        Naming the bad parameter and the value it got.
    """
    name = args.get("window", "lung")
    if name in imaging.PRESETS:
        return imaging.PRESETS[name]
    if name != "custom":
        raise ValueError(f"window must be one of {', '.join(WINDOW_CHOICES)}, got {name!r}")
    center, width = _number(args, "center"), _number(args, "width")
    if not -HU_LIMIT <= center <= HU_LIMIT:
        raise ValueError(
            f"center must be between {-HU_LIMIT:g} and {HU_LIMIT:g} HU, got {args['center']!r}"
        )
    if width <= 0:
        raise ValueError(f"width must be greater than 0 HU, got {args['width']!r}")
    if width > 2 * HU_LIMIT:
        raise ValueError(f"width must be at most {2 * HU_LIMIT:g} HU, got {args['width']!r}")
    return imaging.Window(center, width)


def _number(args: Mapping[str, str], name: str) -> float:
    text = args.get(name)
    if text is None or not text.strip():
        raise ValueError(f"a custom window needs {name} (HU)")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of HU, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of HU, got {text!r}")
    return value


def render_slice(node: Node, item: ViewerSlice, window: imaging.Window) -> bytes:
    """One slice windowed to 8-bit and encoded as PNG.

    Raises :class:`node.analysis.imaging.ImagingError` or ``OSError`` when the file cannot be
    shown: :class:`~node.analysis.imaging.ImageTooLarge`, before anything is decoded, when its
    pixel data declares more than the decode limits (the web UI shares the receiver's process).
    """
    ds = dcmread(node.store.path(item.store_key), defer_size="1 KB")  # pixels read once checked
    limits = AnalysisOptions.from_settings(node.settings).limits
    hu = imaging.hounsfield_frames(ds, limits)
    pixels = imaging.apply_window(hu[item.frame], window)  # only the frame shown
    return imaging.to_png_bytes(pixels, compress_level=1)  # served while scrolling


def etag_for(slices: SliceList, index: int, window: imaging.Window) -> str:
    """A validator for one rendered slice: the slice list, the slice and the window."""
    text = f"{slices.version}/{index}/{window.center!r}/{window.width!r}"
    return hashlib.sha256((text + imaging.PREPROCESSING_VERSION).encode()).hexdigest()[:24]
