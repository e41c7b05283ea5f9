"""node.analysis.imaging: HU, windows, decoding, slice choice and PNG, by hand and on phantoms."""

from __future__ import annotations

import io
import math
import random
import re
import struct
import zlib

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from node import phantom
from node.analysis import imaging
from node.analysis.imaging import LUNG, MEDIASTINUM, ImagingError, Window

# --------------------------------------------------------------------------- builders


def ct_dataset(stored: np.ndarray, **attributes) -> Dataset:
    """A minimal CT Image dataset (Explicit VR Little Endian) holding ``stored`` pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-180, -180, 0]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype("<i2" if ds.PixelRepresentation else "<u2").tobytes()
    return ds


def enhanced_ct(stored: np.ndarray, per_frame: list[dict], shared: dict) -> Dataset:
    """An Enhanced CT dataset; ``per_frame`` and ``shared`` map functional group sequences
    to the attributes of their single item."""
    ds = ct_dataset(stored, SOPClassUID=EnhancedCTImageStorage, NumberOfFrames=len(stored))
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    for keyword in ("RescaleSlope", "RescaleIntercept", "ImageOrientationPatient"):
        delattr(ds, keyword)
    del ds.ImagePositionPatient  # geometry lives in the functional groups
    ds.SharedFunctionalGroupsSequence = [_groups(shared)]
    ds.PerFrameFunctionalGroupsSequence = [_groups(groups) for groups in per_frame]
    return ds


def _groups(groups: dict) -> Dataset:
    item = Dataset()
    for sequence, attributes in groups.items():
        macro = Dataset()
        for keyword, value in attributes.items():
            setattr(macro, keyword, value)
        setattr(item, sequence, [macro])
    return item


def _rescale(slope, intercept) -> dict:
    return {"RescaleSlope": slope, "RescaleIntercept": intercept, "RescaleType": "HU"}


def re_escape(text: str) -> str:
    """A pattern matching exactly ``text``."""
    return "^" + re.escape(text) + "$"


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(20260110)


# --------------------------------------------------------------------------- window


def test_presets_follow_the_seed_equations():
    assert (LUNG.low, LUNG.high) == (-1350.0, 150.0)  # eq. 1 and 2: C -/+ W/2
    assert (MEDIASTINUM.low, MEDIASTINUM.high) == (-160.0, 240.0)
    assert imaging.PRESETS == {"lung": LUNG, "mediastinum": MEDIASTINUM}
    assert imaging.PREPROCESSING_VERSION == "hu-window-uint8/1"


@pytest.mark.parametrize(
    ("center", "width", "message"),
    [
        (40, 0, "width must be greater than 0 HU, got 0.0"),
        (40, -400, "width must be greater than 0 HU, got -400.0"),
        (math.nan, 400, "center must be a finite number of HU, got nan"),
        (40, math.inf, "width must be a finite number of HU, got inf"),
        ("40", 400, "center must be a finite number of HU, got '40'"),
        (40, True, "width must be a finite number of HU, got True"),
    ],
)
def test_window_rejects_bad_values_naming_them(center, width, message):
    with pytest.raises(ValueError, match=re_escape(message)):
        Window(center, width)


# --------------------------------------------------------------------------- HU and window


def test_to_hounsfield_by_hand():
    stored = np.array([[0, 1024], [4095, -2000]], dtype=np.int16)
    hu = imaging.to_hounsfield(stored, 1.0, -1024.0)
    assert hu.dtype == np.float32
    assert hu.tolist() == [[-1024.0, 0.0], [3071.0, -3024.0]]
    assert imaging.to_hounsfield(stored, 0.5, -1000.0).tolist() == [[-1000, -488], [1047.5, -2000]]


@pytest.mark.parametrize(
    ("slope", "intercept", "message"),
    [(0, -1024, "slope must not be 0"), (math.nan, 0, "slope must be finite, got nan")],
)
def test_to_hounsfield_rejects_bad_rescale(slope, intercept, message):
    with pytest.raises(ValueError, match=re_escape(message)):
        imaging.to_hounsfield(np.zeros((2, 2), np.int16), slope, intercept)


@pytest.mark.parametrize(
    ("hu", "window", "expected"),
    [
        (-1024.0, LUNG, 55),  # (-1024 + 1350) / 1500 * 255 = 55.42
        (-1350.0, LUNG, 0),
        (150.0, LUNG, 255),
        (-600.0, LUNG, 128),  # 127.5: halves round up
        (-3024.0, LUNG, 0),  # clipped
        (3071.0, LUNG, 255),
        (0.0, MEDIASTINUM, 102),  # 160 / 400 * 255 = 102.0
        (-100.0, MEDIASTINUM, 38),  # 60 / 400 * 255 = 38.25
        (math.nan, LUNG, 0),  # masked padding
    ],
)
def test_apply_window_by_hand(hu, window, expected):
    out = imaging.apply_window(np.array([[hu]], dtype=np.float32), window)
    assert out.dtype == np.uint8
    assert out[0, 0] == expected


@pytest.mark.parametrize("window", [LUNG, MEDIASTINUM, Window(50, 350), Window(-500, 1400)])
def test_apply_window_equals_the_seed_equations_on_every_integer_hu(window):
    hu = np.arange(-3100, 3200, dtype=np.float32)
    # Eq. 1, 2 and 5 in float64, clipped to 0..255, rounded half up.
    low, high = window.center - window.width / 2, window.center + window.width / 2
    expected = np.floor(np.clip((hu.astype(np.float64) - low) / (high - low) * 255, 0, 255) + 0.5)
    assert np.array_equal(imaging.apply_window(hu, window), expected)


def test_stored_zero_with_intercept_gives_55_in_the_lung_window():
    ds = ct_dataset(np.zeros((4, 4), np.int16))
    assert imaging.hounsfield_frames(ds).tolist() == [np.full((4, 4), -1024.0).tolist()]
    assert (imaging.windowed_slices(ds) == 55).all()


# --------------------------------------------------------------------------- file window


@pytest.mark.parametrize(
    ("center", "width", "expected"),
    [
        (["50", "-600"], ["350", "1200"], Window(50, 350)),  # what real scanners send
        ("-600", "1500", LUNG),
        (None, None, None),
    ],
)
def test_file_window_takes_the_first_value(center, width, expected):
    ds = ct_dataset(np.zeros((2, 2), np.int16))
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    assert imaging.file_window(ds) == expected


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"WindowCenter": "40"}, "the file has only one of Window Center and Window Width"),
        (
            {"WindowCenter": "40", "WindowWidth": "0"},
            "the file's window is not valid: width must be greater than 0 HU, got 0.0",
        ),
    ],
)
def test_file_window_rejects_a_broken_window(attributes, message):
    ds = ct_dataset(np.zeros((2, 2), np.int16), **attributes)
    with pytest.raises(ImagingError, match=re_escape(message)):
        imaging.file_window(ds)


def test_windowed_slices_none_uses_the_file_window_else_lung():
    ds = ct_dataset(np.array([[1064]], np.int16))  # 40 HU
    assert imaging.windowed_slices(ds, None)[0, 0, 0] == 236  # LUNG: 1390 / 1500 * 255
    ds.WindowCenter, ds.WindowWidth = ["40", "-600"], ["400", "1500"]
    assert imaging.windowed_slices(ds, None)[0, 0, 0] == 128  # MEDIASTINUM: 127.5
    assert imaging.windowed_slices(ds)[0, 0, 0] == 236  # the default stays LUNG


# --------------------------------------------------------------------------- bits and padding


def test_12_bits_stored_unsigned_ignores_garbage_high_bits(rng):
    values = rng.integers(0, 4096, (16, 16), dtype=np.uint16)
    garbage = rng.integers(1, 16, (16, 16), dtype=np.uint16) << 12
    ds = ct_dataset(values | garbage, BitsStored=12, HighBit=11)
    hu = imaging.hounsfield_frames(ds)[0]
    assert np.array_equal(hu, values.astype(np.float32) - 1024)


def test_12_bits_stored_signed_is_sign_extended(rng):
    values = rng.integers(-2048, 2048, (16, 16), dtype=np.int16)
    garbage = rng.integers(0, 16, (16, 16), dtype=np.uint16) << 12
    raw = ((values.view(np.uint16) & 0x0FFF) | garbage).view(np.int16)
    ds = ct_dataset(raw, BitsStored=12, HighBit=11, RescaleIntercept="0")
    assert np.array_equal(imaging.hounsfield_frames(ds)[0], values.astype(np.float32))


def test_padding_value_is_compared_on_stored_values_before_rescale():
    stored = np.array([[-2000, -488, 0, 1024]], np.int16)
    ds = ct_dataset(stored, PixelPaddingValue=-2000, RescaleSlope="2", RescaleIntercept="-1024")
    hu = imaging.hounsfield_frames(ds)[0, 0]
    # Stored -488 is -2000 HU after rescale, but only the stored -2000 is padding.
    assert np.isnan(hu[0]) and hu[1:].tolist() == [-2000.0, -1024.0, 1024.0]
    assert imaging.windowed_slices(ds)[0, 0, 0] == 0


@pytest.mark.parametrize(("value", "limit"), [(-2000, -1500), (-1500, -2000)])
def test_padding_range_limit_masks_the_whole_range(value, limit):
    stored = np.array([[-2001, -2000, -1750, -1500, -1499]], np.int16)
    ds = ct_dataset(stored, PixelPaddingValue=value, PixelPaddingRangeLimit=limit)
    hu = imaging.hounsfield_frames(ds)[0, 0]
    assert np.isnan(hu).tolist() == [False, True, True, True, False]


def test_padding_with_12_bits_stored():
    # In range: 0 with garbage above bit 11 is still padding.
    ds = ct_dataset(np.array([[0x0000, 0x7000, 0x7001]], np.uint16), BitsStored=12, HighBit=11)
    ds.PixelPaddingValue = 0
    assert np.isnan(imaging.hounsfield_frames(ds)[0, 0]).tolist() == [True, True, False]
    # Out of range (0xF830, i.e. -2000 written in all 16 bits): only that bit pattern is
    # padding, while 0x0830 (2096 stored, 1072 HU bone) is kept.
    ds = ct_dataset(np.array([[0xF830, 0x0830, 0x5123]], np.uint16), BitsStored=12, HighBit=11)
    ds.PixelPaddingValue = 0xF830
    hu = imaging.hounsfield_frames(ds)[0, 0]
    assert np.isnan(hu[0]) and hu[1:].tolist() == [1072.0, 0x123 - 1024.0]


def test_monochrome1_keeps_hu_and_air_stays_dark(rng):
    stored = rng.integers(-1000, 3000, (8, 8), dtype=np.int16)
    mono2 = ct_dataset(stored)
    mono1 = ct_dataset(stored, PhotometricInterpretation="MONOCHROME1")
    assert imaging.skip_reason(mono1) is None
    assert np.array_equal(imaging.hounsfield_frames(mono1), imaging.hounsfield_frames(mono2))
    assert np.array_equal(imaging.windowed_slices(mono1), imaging.windowed_slices(mono2))


# --------------------------------------------------------------------------- Enhanced CT

FRAME_INTERCEPTS = (-1024, -1000, 0)


@pytest.fixture
def frames(rng) -> np.ndarray:
    return rng.integers(0, 3000, (3, 6, 5), dtype=np.int16)


def test_enhanced_ct_rescales_each_frame_from_per_frame_groups(frames):
    per_frame = [{"PixelValueTransformationSequence": _rescale(1, i)} for i in FRAME_INTERCEPTS]
    ds = enhanced_ct(frames, per_frame, shared={})
    expected = frames + np.array(FRAME_INTERCEPTS, np.float32)[:, None, None]
    assert np.array_equal(imaging.hounsfield_frames(ds), expected)
    ds.compress(RLELossless, encoding_plugin="pydicom")  # multi-frame, encapsulated
    assert np.array_equal(imaging.hounsfield_frames(ds), expected)


def test_enhanced_ct_uses_shared_groups_unless_a_frame_overrides(frames):
    per_frame = [{}, {"PixelValueTransformationSequence": _rescale(2, -2048)}, {}]
    shared = {"PixelValueTransformationSequence": _rescale(1, -1024)}
    hu = imaging.hounsfield_frames(enhanced_ct(frames, per_frame, shared))
    assert np.array_equal(hu[[0, 2]], frames[[0, 2]] - 1024.0)
    assert np.array_equal(hu[1], frames[1] * 2.0 - 2048)


def test_enhanced_ct_window_and_orientation_come_from_functional_groups(frames):
    shared = {
        "PixelValueTransformationSequence": _rescale(1, -1024),
        "FrameVOILUTSequence": {"WindowCenter": ["-600", "40"], "WindowWidth": ["1500", "400"]},
        "PlaneOrientationSequence": {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]},
    }
    ds = enhanced_ct(frames, [{}, {}, {}], shared)
    assert imaging.file_window(ds) == LUNG
    assert imaging.skip_reason(ds) is None
    plane = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    plane.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    assert imaging.skip_reason(ds) == "not axial (orientation [0, 1, 0, 0, 0, -1], 90° from axial)"


# --------------------------------------------------------------------------- bad pixels


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"RescaleIntercept": None}, "no Rescale Slope/Intercept for frame 1: cannot compute HU"),
        ({"RescaleSlope": "0"}, "Rescale Slope 0 / Intercept -1024 of frame 1 is not valid"),
        ({"PixelData": None}, "no pixel data"),
        ({"PhotometricInterpretation": "RGB"}, "not a grayscale image (RGB)"),
        ({"PixelData": b"\0" * 10}, "cannot decode the pixel data (Explicit VR Little Endian): "),
    ],
)
def test_hounsfield_frames_explains_what_is_wrong(attributes, message):
    ds = changed(ct_dataset(np.zeros((4, 4), np.int16)), attributes)
    with pytest.raises(ImagingError, match=re.escape(message)):
        imaging.hounsfield_frames(ds)


def changed(ds: Dataset, attributes: dict) -> Dataset:
    """``ds`` with attributes set, or deleted where the value is None."""
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def test_a_corrupt_codestream_is_reported_with_its_transfer_syntax():
    ds = ct_dataset(np.zeros((4, 4), np.int16))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(30)])
    message = "cannot decode the pixel data (JPEG-LS Lossless Image Compression): "
    with pytest.raises(ImagingError, match=re.escape(message)):
        imaging.hounsfield_frames(ds)


# --------------------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def small_phantom() -> tuple[phantom.PhantomSpec, np.ndarray]:
    """A 3-slice phantom and its exact HU (padding as NaN, as hounsfield_frames gives it)."""
    spec = phantom.PhantomSpec(finding="pneumonia", slices=3, seed=4)
    volume = phantom.generate_hu_volume(spec)
    return spec, np.where(volume == -3024, np.float32(np.nan), volume)


@pytest.mark.parametrize("syntax", list(phantom.TRANSFER_SYNTAXES))
def test_phantom_hu_is_exact_in_every_transfer_syntax(small_phantom, syntax, tmp_path):
    spec, expected = small_phantom
    paths = phantom.write_series(spec, tmp_path, syntax)
    hu = np.concatenate([imaging.hounsfield_frames(dcmread(path)) for path in paths])
    assert hu.dtype == np.float32
    assert np.array_equal(hu, expected, equal_nan=True)
    assert np.isnan(hu).any()  # outside the field of view


def test_chest_series_is_eligible_ordered_and_lungs_found(chest_series):
    spec, paths = chest_series
    datasets = [dcmread(path, defer_size="1 KB") for path in paths]
    assert all(imaging.skip_reason(ds) is None for ds in datasets)
    shuffled = datasets[:]
    random.Random(1).shuffle(shuffled)
    ordered = [shuffled[i] for i in imaging.slice_order(shuffled)]
    assert [ds.InstanceNumber for ds in ordered] == list(range(1, spec.slices + 1))  # head first
    assert imaging.file_window(datasets[0]) == MEDIASTINUM
    fractions = [imaging.lung_fraction(imaging.hounsfield_frames(ds)[0]) for ds in ordered]
    assert min(fractions[15:40]) > 0.3  # mid chest
    assert max(fractions[-3:]) < 0.01  # upper abdomen
    chosen = imaging.select_slices(fractions)
    assert chosen == list(range(chosen[0], chosen[-1] + 1))  # one block, apex to bases
    assert 1 <= chosen[0] <= 3 and spec.slices - 10 <= chosen[-1] < spec.slices - 3
    windowed = imaging.windowed_slices(ordered[30])
    expected = imaging.apply_window(phantom.generate_hu_volume(spec)[30], LUNG)
    inside = np.isfinite(imaging.hounsfield_frames(ordered[30])[0])
    assert np.array_equal(windowed[0][inside], expected[inside])


# --------------------------------------------------------------------------- lung fraction


def _disc(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.ogrid[:size, :size]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _synthetic_chest(table: bool) -> tuple[np.ndarray, float]:
    """Soft-tissue body with two lungs in air, optionally on an open foam-core table."""
    hu = np.full((256, 256), -1000.0, np.float32)
    body = _disc(256, 120, 128, 80, 110)
    lungs = _disc(256, 115, 85, 50, 35) | _disc(256, 115, 171, 50, 35)
    hu[body] = 40.0
    hu[lungs] = -850.0
    if table:
        hu[206:208, 20:236] = 250.0  # carbon skins around a lung-like foam core
        hu[208:220, 16:240] = -860.0
        hu[220:222, 24:232] = 250.0
    return hu, lungs.sum() / body.sum()


@pytest.mark.parametrize("table", [False, True])
def test_lung_fraction_counts_lungs_inside_the_body_only(table):
    hu, truth = _synthetic_chest(table)
    assert imaging.lung_fraction(hu) == pytest.approx(truth, abs=0.02)


def test_lung_fraction_is_zero_without_lungs_or_body():
    abdomen = np.full((128, 128), -1000.0, np.float32)
    abdomen[_disc(128, 64, 64, 50, 60)] = 40.0
    abdomen[_disc(128, 60, 50, 6, 6)] = -1000.0  # bowel gas
    assert imaging.lung_fraction(abdomen) < 0.01
    assert imaging.lung_fraction(np.full((64, 64), -1000.0, np.float32)) == 0.0
    assert imaging.lung_fraction(np.full((64, 64), np.nan, np.float32)) == 0.0


def test_select_slices_keeps_the_lung_span_then_strides():
    # index 3 is a consolidated slice between lung-bearing ones: it stays
    fractions = [0.0, 0.1, 0.2, 0.01, 0.3, 0.5, 0.04, 0.05, 0.0]
    assert imaging.select_slices(fractions) == [1, 2, 3, 4, 5, 6, 7]
    assert imaging.select_slices(fractions, stride=2) == [1, 3, 5, 7]
    assert imaging.select_slices(fractions, min_lung_fraction=0.25) == [4, 5]
    assert imaging.select_slices([0.0, 0.01]) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"stride": 0}, "stride must be an integer >= 1, got 0"),
        ({"stride": 1.5}, "stride must be an integer >= 1, got 1.5"),
        ({"min_lung_fraction": 1.5}, "min_lung_fraction must be between 0 and 1, got 1.5"),
    ],
)
def test_select_slices_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=re_escape(message)):
        imaging.select_slices([0.5], **arguments)


# --------------------------------------------------------------------------- skip and order

TILT = math.radians(20)


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({}, None),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer image"),
        ({"SOPClassUID": ComprehensiveSRStorage, "Modality": "SR"}, "not a CT image (SR)"),
        (
            {"SOPClassUID": SecondaryCaptureImageStorage},
            "not a CT image (Secondary Capture Image Storage)",
        ),
        ({"PixelData": None}, "no pixel data"),
        (
            {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]},
            "not axial (orientation [0, 1, 0, 0, 0, -1], 90° from axial)",
        ),
        (
            {"ImageOrientationPatient": [1, 0, 0, 0, 0.6, -0.8]},
            "not axial (orientation [1, 0, 0, 0, 0.6, -0.8], 53° from axial)",
        ),
        ({"ImageOrientationPatient": [1, 0, 0, 0, math.cos(TILT), math.sin(TILT)]}, None),
        ({"ImageOrientationPatient": [-1, 0, 0, 0, -1, 0]}, None),  # prone
        (
            {"ImageType": ["DERIVED", "SECONDARY", "REFORMATTED"]},
            "not axial (image type DERIVED/SECONDARY/REFORMATTED)",
        ),
        ({"PhotometricInterpretation": "RGB"}, "not a grayscale image (RGB)"),
        ({"PhotometricInterpretation": "MONOCHROME1"}, None),
    ],
)
def test_skip_reason(attributes, expected):
    ds = changed(ct_dataset(np.zeros((2, 2), np.int16)), attributes)
    assert imaging.skip_reason(ds) == expected


@pytest.mark.parametrize("orientation", [[1, 0, 0, 0, 1, 0], [-1, 0, 0, 0, 1, 0]])
def test_slice_order_is_head_first_whatever_the_orientation(orientation):
    z = [-40.0, 10.0, -15.0, 35.0]
    datasets = [
        ct_dataset(np.zeros((2, 2), np.int16), ImagePositionPatient=[0, 0, h], InstanceNumber=n)
        for n, h in enumerate(z, start=1)
    ]
    for ds in datasets:
        ds.ImageOrientationPatient = orientation
    assert imaging.slice_order(datasets) == [3, 1, 2, 0]  # z 35, 10, -15, -40
    for ds in datasets:
        del ds.ImagePositionPatient
    assert imaging.slice_order(datasets) == [0, 1, 2, 3]  # Instance Number


# --------------------------------------------------------------------------- PNG


def test_png_round_trips(rng):
    image = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    data = imaging.to_png_bytes(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (53, 37)  # IHDR width, height
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]  # IHDR CRC
    from PIL import Image

    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == "L"
        assert np.array_equal(np.asarray(decoded), image)


@pytest.mark.parametrize(
    "image",
    [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4), np.uint8)],
)
def test_png_rejects_what_is_not_a_grayscale_byte_image(image):
    with pytest.raises(ValueError, match="image must be a non-empty 2-D uint8 array"):
        imaging.to_png_bytes(image)
