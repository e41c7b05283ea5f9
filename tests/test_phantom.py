"""The synthetic chest-CT phantom: anatomy, findings, DICOM attributes and encodings."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node import phantom
from node.phantom import PhantomSpec

STATS_SEED = 3
STATS_SLICES = 30  # 10 mm slices: enough for the statistics, quick to render


def _lower(count: int) -> slice:
    return slice(count // 2, count)


@pytest.fixture(scope="module")
def volumes() -> dict[str, np.ndarray]:
    """HU volumes of every class for one seed; they share anatomy and noise."""
    return {
        finding: phantom.generate_hu_volume(
            PhantomSpec(finding=finding, seed=STATS_SEED, slices=STATS_SLICES)
        )
        for finding in phantom.CLASSES
    }


@pytest.fixture(scope="module")
def lungs() -> tuple[np.ndarray, np.ndarray]:
    """Right and left lung masks of the statistics seed."""
    return phantom._lung_masks(PhantomSpec(seed=STATS_SEED, slices=STATS_SLICES))


@pytest.fixture(scope="module")
def reference() -> list:
    """A short explicit-VR series to compare encodings against."""
    return phantom.generate_series(PhantomSpec(finding="pneumonia", slices=2, seed=5))


# --------------------------------------------------------------------------- volume


def test_volume_shape_range_and_padding(volumes):
    volume = volumes["normal"]
    assert volume.shape == (STATS_SLICES, 512, 512)
    assert volume.dtype == np.float32
    assert np.array_equal(volume, np.rint(volume))
    fov = _fov(512)
    assert (volume[:, ~fov] == -3024).all()  # stored -2000 after the -1024 intercept
    inside = volume[:, fov]
    assert inside.min() >= -1024 and inside.max() <= 3071


def _fov(size: int) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    return r[:, None] ** 2 + r[None, :] ** 2 <= (size / 2) ** 2


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    spec = PhantomSpec(finding="covid", slices=3, seed=11)
    first = phantom.write_series(spec, tmp_path / "a")
    second = phantom.write_series(spec, tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    other = phantom.generate_hu_volume(PhantomSpec(finding="covid", slices=3, seed=12))
    assert not np.array_equal(other, phantom.generate_hu_volume(spec))


def test_classes_differ_only_inside_the_lungs(volumes, lungs):
    inside = _grow(lungs[0] | lungs[1], 1)  # the scanner blur reaches one pixel out
    for finding in ("covid", "pneumonia"):
        changed = volumes[finding] != volumes["normal"]
        assert changed.any()
        assert not (changed & ~inside).any(), finding


def test_normal_lungs(volumes, lungs):
    right, left = lungs
    normal = volumes["normal"]
    assert right.sum() > 100_000 and left.sum() > 100_000
    assert -880 < normal[right | left].mean() < -820
    # DICOM LPS: the patient's right is on the image's left.
    columns = np.nonzero(right)[2].mean(), np.nonzero(left)[2].mean()
    assert columns[0] < 256 < columns[1]
    # Small at the apex, large at the bases, gone below the diaphragm domes.
    area = (right | left).sum(axis=(1, 2))
    assert area[1] < area[STATS_SLICES // 2] / 3
    assert area[-1] < area[STATS_SLICES // 2] / 10


def test_normal_anatomy_densities(volumes):
    normal = volumes["normal"]
    middle = normal[STATS_SLICES // 2]
    assert (middle > 500).sum() > 1000  # spine, ribs and sternum
    top = normal[1]
    assert (top[200:300, 230:290] < -950).sum() > 50  # tracheal air near the midline
    liver = normal[-2, 250:270, 150:170]  # right upper quadrant below the dome
    assert 40 < liver.mean() < 75
    assert 6 < liver.std() < 14  # ~10 HU of noise


def test_covid_ground_glass_bilateral_peripheral_lower(volumes, lungs):
    right, left = lungs
    covid, normal = volumes["covid"], volumes["normal"]
    lower = _lower(STATS_SLICES)
    for lung in (right, left):
        in_range = [((v >= -700) & (v <= -300))[lower][lung[lower]].mean() for v in (covid, normal)]
        assert in_range[0] > in_range[1] + 0.08
    ggo = (right | left) & (covid - normal > 150)
    assert 0.25 < ggo[:, :, :256].sum() / ggo.sum() < 0.75  # both lungs
    assert np.median(covid[ggo]) == pytest.approx(-500, abs=100)
    assert ggo[lower].sum() > 0.6 * ggo.sum()
    # Peripheral: further from the midline than lung tissue on average.
    distance = np.abs(np.arange(512) - 255.5)
    columns = np.nonzero(ggo)[2], np.nonzero(right | left)[2]
    assert distance[columns[0]].mean() > 1.05 * distance[columns[1]].mean()


def test_pneumonia_consolidates_one_lung_with_air_bronchograms(volumes, lungs):
    pneumonia = volumes["pneumonia"]
    dense = (pneumonia >= 0) & (pneumonia <= 40)
    fractions = sorted([dense[lung].mean() for lung in lungs])
    assert fractions[1] > 0.1 and fractions[0] < 0.02
    sick = max(lungs, key=lambda lung: dense[lung].mean())
    consolidated = dense & sick
    for index in (STATS_SLICES // 2, 2 * STATS_SLICES // 3):  # mid and lower slices
        assert consolidated[index].sum() > 2000
    # Air bronchograms: dark branches well inside the (closed) consolidation, not its rim.
    inside = ~_grow(~_close(consolidated, 4), 3)
    assert (inside & (pneumonia < -300)).sum() > 300


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """In-plane dilation by a square of side 2 * steps + 1."""
    for _ in range(steps):
        mask = mask | np.roll(mask, 1, 1) | np.roll(mask, -1, 1)
        mask = mask | np.roll(mask, 1, 2) | np.roll(mask, -1, 2)
    return mask


def _close(mask: np.ndarray, steps: int) -> np.ndarray:
    """In-plane morphological closing (the masks never touch the image border)."""
    return ~_grow(~_grow(mask, steps), steps)


def test_findings_move_with_the_seed():
    def ggo(seed: int) -> np.ndarray:
        specs = [PhantomSpec(finding=f, seed=seed, slices=10, rows=128, columns=128) for f in
                 ("covid", "normal")]  # fmt: skip
        covid, normal = (phantom.generate_hu_volume(spec) for spec in specs)
        return covid - normal > 150

    first, second = ggo(1), ggo(2)
    assert first.sum() > 100 and second.sum() > 100
    assert (first & second).sum() < 0.5 * min(first.sum(), second.sum())


# --------------------------------------------------------------------------- DICOM


TYPE_1_AND_2 = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "PatientPosition",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Manufacturer",
    "InstanceNumber",
    "ImageType",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
    "RescaleIntercept",
    "RescaleSlope",
    "KVP",
    "AcquisitionNumber",
]


def test_ct_image_attributes(reference):
    spec = PhantomSpec(finding="pneumonia", slices=2, seed=5)
    stored = phantom.generate_hu_volume(spec) + 1024
    for index, ds in enumerate(reference):
        missing = [keyword for keyword in TYPE_1_AND_2 if keyword not in ds]
        assert not missing
        assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.Modality == "CT" and ds.Manufacturer == "ainode phantom"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (
            16, 16, 15, 1,
        )  # fmt: skip
        assert (ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType) == (-1024, 1, "HU")
        assert list(ds.WindowCenter) == [40, -600] and list(ds.WindowWidth) == [400, 1500]
        assert list(ds.WindowCenterWidthExplanation) == ["MEDIASTINUM", "LUNG"]
        assert ds.PixelPaddingValue == -2000
        assert (ds.PatientPosition, ds.BodyPartExamined) == ("HFS", "CHEST")
        pixels = ds.pixel_array
        assert pixels.dtype == np.int16
        assert np.array_equal(pixels, stored[index])
        assert pixels[0, 0] == -2000 and pixels[256, 256] > -1000


def test_geometry_is_consistent():
    datasets = phantom.generate_series(PhantomSpec(slices=8, rows=128, columns=128))
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 9))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    spacing = float(datasets[0].SpacingBetweenSlices)
    assert np.allclose(np.diff(z), -spacing, atol=1e-4)  # head first: z falls with the number
    assert spacing == float(datasets[0].SliceThickness) == 300 / 8
    assert np.allclose(z, [float(ds.SliceLocation) for ds in datasets])
    assert {tuple(ds.ImagePositionPatient[:2]) for ds in datasets} == {
        tuple(datasets[0].ImagePositionPatient[:2])
    }
    assert all(list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0] for ds in datasets)
    assert float(datasets[0].PixelSpacing[0]) == pytest.approx(360 / 128)
    assert len({ds.SOPInstanceUID for ds in datasets}) == 8
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[keyword].value for ds in datasets}) == 1


def test_default_series_has_5_mm_slices():
    geometry = phantom._geometry(PhantomSpec(), np.random.default_rng(0))
    assert geometry.thickness == 5.0
    assert geometry.pixel_spacing == pytest.approx(0.703125)


def test_uids_are_stable_and_overridable():
    spec = PhantomSpec(slices=1, rows=64, columns=64)
    first, second = phantom.generate_series(spec)[0], phantom.generate_series(spec)[0]
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.StudyInstanceUID.startswith("2.25.")
    covid = phantom.generate_series(PhantomSpec(finding="covid", slices=1, rows=64, columns=64))
    assert covid[0].StudyInstanceUID != first.StudyInstanceUID
    given = PhantomSpec(
        slices=1, rows=64, columns=64, study_instance_uid="1.2.3", series_instance_uid="1.2.3.4"
    )
    ds = phantom.generate_series(given)[0]
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("1.2.3", "1.2.3.4")


@pytest.mark.parametrize(
    ("charset", "encoded"),
    [("ISO_IR 100", "Tórax Simple".encode("latin-1")), ("ISO_IR 192", "Tórax Simple".encode())],
)
def test_text_is_encoded_in_the_character_set(tmp_path, charset, encoded):
    spec = PhantomSpec(slices=1, rows=64, columns=64, charset=charset, patient_name="MÜLLER^JOSÉ")
    path = phantom.write_series(spec, tmp_path)[0]
    raw = path.read_bytes()
    assert encoded in raw
    assert "MÜLLER^JOSÉ".encode("latin-1" if charset == "ISO_IR 100" else "utf-8") in raw
    if charset == "ISO_IR 100":
        assert b"T\xf3rax" in raw and "Tórax".encode() not in raw
    ds = dcmread(path)
    assert ds.SpecificCharacterSet == charset
    assert ds.StudyDescription == "Tórax Simple" and ds.PatientName == "MÜLLER^JOSÉ"


# --------------------------------------------------------------------------- encodings


def _needs(tool: str) -> None:
    # The test command installs DCMTK; its absence is a broken set-up, not a reason to skip.
    assert shutil.which(tool) is not None, f"DCMTK {tool} is not installed"


@pytest.mark.parametrize("name", list(phantom.TRANSFER_SYNTAXES))
def test_transfer_syntax_round_trip(tmp_path, reference, name):
    if name == "jpeg-lossless":
        _needs("dcmcjpeg")
    spec = PhantomSpec(finding="pneumonia", slices=2, seed=5)
    paths = phantom.write_series(spec, tmp_path, name)
    assert [p.name for p in paths] == ["0001.dcm", "0002.dcm"]
    for path, original in zip(paths, reference, strict=True):
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == phantom.TRANSFER_SYNTAXES[name]
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(ds.pixel_array, original.pixel_array)
    if shutil.which("dcmdump"):
        done = subprocess.run(["dcmdump", paths[0]], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "CTImageStorage" in done.stdout and "E:" not in done.stderr


def test_jpeg_lossless_decodes_with_dcmtk(tmp_path, reference):
    _needs("dcmcjpeg")
    _needs("dcmdjpeg")
    encoded = phantom.encode_dataset(reference[0], phantom.TRANSFER_SYNTAXES["jpeg-lossless"])
    encoded.save_as(tmp_path / "in.dcm", enforce_file_format=True)
    subprocess.run(["dcmdjpeg", tmp_path / "in.dcm", tmp_path / "out.dcm"], check=True)
    assert np.array_equal(dcmread(tmp_path / "out.dcm").pixel_array, reference[0].pixel_array)


def test_encode_dataset_returns_a_copy(reference):
    original = reference[0]
    before = original.PixelData
    compressed = phantom.encode_dataset(original, "jpeg-ls")
    assert compressed is not original
    assert original.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert original.PixelData == before
    assert compressed.file_meta.TransferSyntaxUID.is_compressed
    back = phantom.encode_dataset(compressed, "implicit")  # compressed input is decoded first
    assert back.file_meta.TransferSyntaxUID == phantom.TRANSFER_SYNTAXES["implicit"]
    assert np.array_equal(back.pixel_array, original.pixel_array)


def test_jpeg_lossless_without_dcmtk(tmp_path, reference, monkeypatch):
    monkeypatch.setattr(phantom.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="dcmcjpeg"):
        phantom.encode_dataset(reference[0], "jpeg-lossless")
    with pytest.raises(RuntimeError, match="dcmcjpeg"):
        phantom.write_series(PhantomSpec(slices=1), tmp_path, "jpeg-lossless")


def test_unknown_transfer_syntax(reference, tmp_path):
    with pytest.raises(ValueError, match="^transfer_syntax must be one of"):
        phantom.encode_dataset(reference[0], "jpeg-xl")
    with pytest.raises(ValueError, match="^transfer_syntax"):
        phantom.write_series(PhantomSpec(slices=1), tmp_path, "1.2.840.10008.1.2.4.50")


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("finding", "foo"),
        ("slices", 0),
        ("slices", "60"),
        ("slices", True),
        ("seed", -1),
        ("rows", 32),
        ("columns", 5000),
        ("charset", "ISO_IR 6"),
        ("patient_sex", "X"),
        ("patient_name", "Ωmega^Ann"),  # not Latin-1 (see the charset below)
        ("patient_id", "x" * 65),
        ("accession_number", "A" * 17),
        ("study_description", "a\\b"),
        ("series_description", "line\nbreak"),
        ("study_date", "2026-01-10"),
        ("study_date", "20261301"),
        ("patient_birth_date", "20270101"),
        ("study_time", "25:00"),
        ("study_instance_uid", "1.2.abc"),
        ("series_instance_uid", "1." + "2" * 70),
    ],
)
def test_bad_arguments_name_the_argument(field, value):
    arguments = {"charset": "ISO_IR 100", field: value}
    with pytest.raises(ValueError, match=f"^{field} "):
        PhantomSpec(**arguments)


def test_finding_error_message():
    with pytest.raises(ValueError) as error:
        PhantomSpec(finding="foo")
    assert str(error.value) == "finding must be one of covid, normal, pneumonia, got 'foo'"


# --------------------------------------------------------------------------- command line


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    phantom.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_writes_the_series(tmp_path, capsys):
    out = tmp_path / "series"
    args = _parse(
        ["--class", "covid", "--slices", "2", "--out", str(out), "--transfer-syntax", "rle",
         "--charset", "latin1", "--patient-name", "PÉREZ^ANA", "--study-uid", "1.2.3.4"]
    )  # fmt: skip
    assert phantom.run(args) == 0
    assert capsys.readouterr().out == f"wrote 2 CT slices (covid, rle) to {out}\n"
    ds = dcmread(out / "0001.dcm")
    assert ds.file_meta.TransferSyntaxUID == phantom.TRANSFER_SYNTAXES["rle"]
    assert ds.SpecificCharacterSet == "ISO_IR 100" and ds.PatientName == "PÉREZ^ANA"
    assert ds.StudyInstanceUID == "1.2.3.4"


def test_cli_defaults_and_aliases():
    args = _parse(["--out", "x", "--charset", "utf8"])
    assert (args.finding, args.slices, args.seed, args.transfer_syntax) == (
        "normal", 60, 0, "explicit",
    )  # fmt: skip
    assert args.charset == "ISO_IR 192"
    with pytest.raises(SystemExit):
        _parse(["--out", "x", "--class", "flu"])
    with pytest.raises(SystemExit):
        _parse(["--slices", "3"])  # --out is required


def test_cli_reports_bad_values(tmp_path, capsys):
    assert phantom.run(_parse(["--out", str(tmp_path), "--slices", "0"])) == 2
    assert "slices must be between" in capsys.readouterr().err
    assert phantom.run(_parse(["--out", str(tmp_path), "--transfer-syntax", "jpeg"])) == 2
    assert "transfer_syntax" in capsys.readouterr().err
