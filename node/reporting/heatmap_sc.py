"""The key slices' Grad-CAM maps as DICOM Secondary Capture images, sent with the SR.

With ``report_heatmaps`` on, each key slice of a report becomes one RGB Secondary Capture
(``hd.sc.SCImage``) in a new series of the source study: the slice in the analysis window
with its map overlaid in colour (:func:`node.analysis.gradcam.overlay_rgba`, red strongest),
a caption burnt in (and DEMO when the model is the demo), its Source Image Sequence naming
the slice. Any PACS viewer shows them, including one that cannot read the SR.

Their UIDs are derived from the SR's SOP Instance UID, which a report keeps across retries
(UUID version 5 under the ``2.25`` root, DICOM PS3.5 B.2): a PACS that stored them already
receives the same instances again. They travel in the SR's association (C-STORE) or
request (STOW-RS); the SR is the report, so a heatmap image the PACS refuses is logged and
the report counts as sent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node import __version__
from node.analysis import gradcam, imaging
from node.analysis.result import StudyResult
from node.reporting.sr import (
    ALGORITHM_PURPOSE,
    FINDING_CODES,
    DeviceObserver,
)

log = logging.getLogger(__name__)

SERIES_NUMBER = 9902  # the SR's series is 9901
OPACITY = 0.5  # the map over the slice: half, so the anatomy under the red stays readable
SERIES_DESCRIPTION = "ainode AI heatmap (Grad-CAM) of the key slices"
DEMO_SERIES_DESCRIPTION = "DEMO AI heatmap (Grad-CAM) - not for clinical use"
# the namespace of the derived UIDs: uuid5(NAMESPACE_OID, "ainode heatmap secondary capture")
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "ainode heatmap secondary capture")
# patient direction letters of +x, +y, +z (PS3.3 C.7.6.1.1.1): left, posterior, head
_DIRECTIONS = (("L", "R"), ("P", "A"), ("H", "F"))


class HeatmapImageError(ValueError):
    """A heatmap image cannot be made from these inputs; the message says why."""


def derived_uid(sr_sop_instance_uid: str, *parts: object) -> str:
    """A UID that depends only on the SR's SOP Instance UID and ``parts`` (the same for
    every retry of one report, different for every report): ``2.25.`` and a UUID v5."""
    name = "/".join([str(sr_sop_instance_uid), *(str(part) for part in parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def blend(windowed: np.ndarray, heatmap: np.ndarray, opacity: float = OPACITY) -> np.ndarray:
    """RGB uint8 ``(rows, columns, 3)``: the windowed uint8 slice in grey with the stored map
    (any resolution) overlaid in the viewer's colours, ``opacity`` at the strongest evidence."""
    grey = np.asarray(windowed, dtype=np.uint8)
    if grey.ndim != 2:
        raise HeatmapImageError(f"the slice must be 2-D, got shape {grey.shape}")
    if not 0 <= opacity <= 1:
        raise HeatmapImageError(f"opacity must be between 0 and 1, got {opacity!r}")
    overlay = gradcam.overlay_rgba(heatmap, grey.shape).astype(np.float64)
    alpha = overlay[..., 3:] / 255.0 * opacity
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=2) * (1 - alpha) + overlay[..., :3] * alpha
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def caption(result: StudyResult) -> list[str]:
    """The lines burnt into each image: what it shows and, for the demo model, that it is one."""
    finding = FINDING_CODES.get(result.predicted_class)
    name = finding.meaning if finding is not None else result.predicted_class
    lines = [f"AI heatmap (Grad-CAM): evidence for {name}"]
    if result.model.demo:
        lines.append("DEMO model - not for clinical use")
    return lines


def _burn_in(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``rgb`` with ``lines`` written at its top left, white on a dark band."""
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, rgb.shape[0] // 40))
    top = 2
    for line in lines:
        left, upper, right, lower = draw.textbbox((4, top), line, font=font)
        draw.rectangle((left - 2, upper - 1, right + 2, lower + 1), fill=(0, 0, 0))
        draw.text((4, top), line, fill=(255, 255, 255), font=font)
        top = lower + 3
    return np.asarray(image)


def _patient_orientation(ds: Dataset, frame: int) -> tuple[str, str]:
    """Patient Orientation (row and column directions) of a slice, from its Image
    Orientation (Patient): e.g. ``("L", "P")`` for an axial slice seen from the feet."""
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None:
        item = _functional_item(ds, "PlaneOrientationSequence", frame)
        orientation = item.get("ImageOrientationPatient") if item is not None else None
    if orientation is None or len(orientation) != 6:
        raise HeatmapImageError("the source slice has no Image Orientation (Patient)")
    cosines = np.asarray([float(v) for v in orientation]).reshape(2, 3)

    def letters(vector: np.ndarray) -> str:
        order = np.argsort(-np.abs(vector))
        chosen = [_DIRECTIONS[a][0 if vector[a] > 0 else 1] for a in order if abs(vector[a]) > 0.1]
        return "".join(chosen[:3])

    return letters(cosines[0]), letters(cosines[1])


def _pixel_spacing(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """The slice's Pixel Spacing (single-frame, or the frame's Pixel Measures), or None."""
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        item = _functional_item(ds, "PixelMeasuresSequence", frame)
        spacing = item.get("PixelSpacing") if item is not None else None
    return (float(spacing[0]), float(spacing[1])) if spacing is not None else None


def _functional_item(ds: Dataset, sequence: str, frame: int) -> Dataset | None:
    """The first item of ``sequence`` for ``frame`` (per-frame, else shared), or None."""
    places = (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0))
    for groups, index in places:
        items = ds.get(groups)
        if items is not None and len(items) > index and sequence in items[index]:
            return items[index][sequence][0]
    return None


def _source_reference(ds: Dataset, frame: int | None) -> Dataset:
    """A Source Image Sequence item naming the slice (and its frame, in a multi-frame)."""
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame + 1
    return item


def _algorithm(result: StudyResult, observer: DeviceObserver) -> hd.ContributingEquipment:
    """The model as the equipment that made the map (as the SR names it)."""
    return hd.ContributingEquipment(
        manufacturer=observer.manufacturer,
        purpose_of_reference=ALGORITHM_PURPOSE,
        manufacturer_model_name=result.model.name,
        software_versions=result.model.version,
        contribution_description=f"{gradcam.METHOD} map of {result.model.label}"[:1024],
    )


def build_heatmap_images(
    result: StudyResult,
    sources: Mapping[str, Dataset],
    observer: DeviceObserver,
    *,
    sr_sop_instance_uid: str,
    window: imaging.Window,
    limits: imaging.DecodeLimits = imaging.DEFAULT_LIMITS,
) -> list[Dataset]:
    """One Secondary Capture per key slice that has a stored map, strongest first.

    Parameters
    ----------
    result
        The analysis, its key slices carrying their maps (``heatmap``, as stored).
    sources
        The key slices' source instances, with pixel data, by SOP Instance UID.
    observer
        The node, recorded as the images' manufacturer.
    sr_sop_instance_uid
        The report's SR: the images' UIDs are derived from it.
    window
        The window the slice is shown in (the analysis window).

    Raises
    ------
    HeatmapImageError
        When a source is missing or unusable, a map is damaged, or highdicom refuses.
    """
    keyed = [key for key in result.key_slices if key.get("heatmap")]
    series_uid = derived_uid(sr_sop_instance_uid, "series")
    description = DEMO_SERIES_DESCRIPTION if result.model.demo else SERIES_DESCRIPTION
    lines = caption(result)
    images = []
    for number, key in enumerate(keyed, start=1):
        position = int(key["position"])
        item = result.slices[position]
        source = sources.get(item.sop_instance_uid)
        if source is None:
            raise HeatmapImageError(f"the source of key slice {item.sop_instance_uid} is missing")
        frame = item.frame or 0
        try:
            hu = imaging.hounsfield_frames(source, limits)[frame]
            heatmap = gradcam.decode(key["heatmap"])
        except ValueError as exc:  # ImagingError is one; a damaged stored map too
            raise HeatmapImageError(f"key slice {item.sop_instance_uid}: {exc}") from exc
        rgb = _burn_in(blend(imaging.apply_window(hu, window), heatmap), lines)
        try:
            image = hd.sc.SCImage.from_ref_dataset(
                source,
                rgb,
                "RGB",
                8,
                "PATIENT",
                series_instance_uid=series_uid,
                series_number=SERIES_NUMBER,
                sop_instance_uid=derived_uid(sr_sop_instance_uid, "key slice", position),
                instance_number=number,
                manufacturer=observer.manufacturer,
                pixel_spacing=_pixel_spacing(source, frame),
                patient_orientation=_patient_orientation(source, frame),
                transfer_syntax_uid=ExplicitVRLittleEndian,
                contributing_equipment=[_algorithm(result, observer)],
                series_description=description,
                manufacturer_model_name=observer.model_name,
                software_versions=__version__,
                device_serial_number=observer.serial_number,
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise HeatmapImageError(f"highdicom refused the heatmap image: {exc}") from exc
        image.SourceImageSequence = [_source_reference(source, item.frame)]
        image.DerivationDescription = (
            f"{gradcam.METHOD} map of the evidence for {result.predicted_class} over the "
            f"slice in window C {window.center:g} / W {window.width:g} HU"
        )[:1024]
        # the caption names neither the patient nor the date: not "burned in annotation"
        # in DICOM's sense (PS3.3 C.7.6.1.1.3), which is about identifying the patient
        image.BurnedInAnnotation = "NO"
        image.ImageComments = " - ".join(lines)[:10240]
        images.append(image)
    return images
