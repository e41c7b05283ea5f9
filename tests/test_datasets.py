"""Dataset readers and patient splits, on small datasets written in the real file formats."""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ainode.cli import main
from node.analysis.result import CLASSES
from training.covidx import covidx_keys, covidx_variant, read_covidx
from training.datasets import DatasetError, read_class_folders, read_export, read_patient_keys
from training.samples import SPLITS, Sample, read_samples, sha256_of
from training.splits import (
    LeakError,
    check_no_leak,
    exclude_patients,
    split_by_patient,
    split_counts,
)

LIDC_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.268992195564407418480563388746"
# (split, file name, class number, box): names in the schemes COVIDx CT-2A publishes.
COVIDX_LINES = [
    ("train", "NCP_96_1328_0032.png", 2, (10, 12, 50, 40)),
    ("train", "NCP_96_1328_0033.png", 2, (11, 12, 50, 41)),
    ("train", "CP_5_3509_0130.png", 1, (4, 6, 60, 58)),
    ("train", "Normal_12_40_0001.png", 0, (0, 0, 64, 64)),
    ("train", "137covid_patient100_SR_2_IM00028.png", 2, (5, 5, 59, 59)),
    ("train", "HUST-Patient1314-0348.png", 2, (3, 3, 60, 60)),
    ("val", "volume-covid19-A-0698_ct-0017.png", 2, (8, 8, 56, 56)),
    ("val", f"LIDC-IDRI-0273-{LIDC_UID}-0093.png", 0, (2, 2, 62, 62)),
    ("val", "radiopaedia-40860-43528-1-0012.png", 0, (1, 2, 63, 62)),
    # Named like a COVID-19 (NCP) source but listed as class 0: the class column wins.
    ("test", "NCP_7_20_0005.png", 0, (9, 9, 55, 55)),
    ("test", "coronacases_org_001-0123.png", 2, (6, 6, 58, 58)),
    ("test", "ctmd-017-series3-0044.png", 1, (7, 7, 57, 57)),
]
METADATA_HEADER = (
    "patient id,source,country,sex,age,finding,verified finding,slice selection,view,modality"
)
MANIFEST_HEADER = (
    "path,label,keyword,patient,study,series,instance,slice_index,window_center,window_width,source"
)


def write_png(path: Path, value: int = 100) -> Path:
    """A small 8-bit grey PNG, as COVIDx and node exports store slices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((64, 64), value, dtype=np.uint8)
    pixels[16:48, 16:48] = 255 - value
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def covidx(tmp_path) -> Path:
    """A COVIDx CT-2A folder: 2A_images/, the three split files and metadata.csv."""
    root = tmp_path / "COVIDx-CT-2A"
    for split in SPLITS:
        lines = [
            f"{name} {number} {' '.join(map(str, box))}"
            for where, name, number, box in COVIDX_LINES
            if where == split
        ]
        (root / f"{split}_COVIDx_CT-2A.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}_COVIDx_CT-2A.txt").write_text("\n".join(lines) + "\n")
    for _, name, number, _ in COVIDX_LINES:
        write_png(root / "2A_images" / name, value=40 * number)
    metadata = [
        METADATA_HEADER,
        "NCP_96,CNCB,China,,,COVID-19,Yes,Expert,Axial,CT",
        "ctmd-017,COVID-CT-MD,Iran,M,50,Pneumonia,Yes,Expert,Axial,CT",
    ]
    (root / "metadata.csv").write_text("\n".join(metadata) + "\n")
    return root


def by_name(samples: list[Sample]) -> dict[str, Sample]:
    return {s.path.name: s for s in samples}


def test_covidx_reads_labels_splits_and_boxes_as_published(covidx):
    samples = by_name(read_covidx(covidx))

    assert len(samples) == len(COVIDX_LINES)
    for split, name, number, box in COVIDX_LINES:
        sample = samples[name]
        assert sample.split == split
        assert sample.label == ("Normal", "Pneumonia", "Covid_19")[number]
        assert sample.box == box
        assert sample.path == covidx / "2A_images" / name
        assert sample.path.is_absolute()
        assert sample.source == "covidx:COVIDx-CT-2A"
    assert samples["NCP_7_20_0005.png"].label == "Normal"
    assert samples["NCP_96_1328_0032.png"].slice_index == 32


def test_covidx_without_boxes(covidx):
    assert all(s.box is None for s in read_covidx(covidx, use_box=False))


def test_covidx_uses_the_metadata_patient_ids_for_names_no_rule_knows(covidx, caplog):
    samples = by_name(read_covidx(covidx))
    assert samples["ctmd-017-series3-0044.png"].patient == "ctmd-017"

    (covidx / "metadata.csv").unlink()
    with caplog.at_level(logging.WARNING):
        samples = by_name(read_covidx(covidx))
    assert samples["ctmd-017-series3-0044.png"].patient == "ctmd-017-series3"
    assert "follow no known COVIDx scheme" in caplog.text


@pytest.mark.parametrize(
    "name, patient, study",
    [
        ("NCP_96_1328_0032", "NCP_96", "NCP_96_1328"),
        ("CP_5_3509_0130", "CP_5", "CP_5_3509"),
        ("Normal_2_10_0001", "Normal_2", "Normal_2_10"),
        ("137covid_patient100_SR_2_IM00028", "patient100", "patient100_SR_2"),
        ("volume-covid19-A-0698_ct-0017", "volume-covid19-A-0698", "volume-covid19-A-0698_ct"),
        ("volume-covid19-A-0047_1_ct-0012", "volume-covid19-A-0047", "volume-covid19-A-0047_1_ct"),
        ("volume-covid19-A-0699-0041", "volume-covid19-A-0699", "volume-covid19-A-0699"),
        ("HUST-Patient1314-0348", "HUST-Patient1314", "HUST-Patient1314"),
        (f"LIDC-IDRI-0273-{LIDC_UID}-0093", "LIDC-IDRI-0273", f"LIDC-IDRI-0273-{LIDC_UID}"),
        ("radiopaedia-40860-43528-1-0012", "radiopaedia-40860", "radiopaedia-40860-43528"),
        ("radiopaedia_10_85902_1-0123", "radiopaedia_10_85902", "radiopaedia_10_85902_1"),
        ("coronacases_org_001-0123", "coronacases_001", "coronacases_org_001"),
        ("study_0255-0012", "study_0255", "study_0255"),
        ("STOIC-10221-0076", "STOIC-10221", "STOIC-10221"),
        ("STOIC-97-0100", "STOIC-97", "STOIC-97"),
        (
            "A056642-01-07-1901-NA-CT-CHEST-PULMONARY-ANGIO-WITH-IV-CON-99467-200-0002",
            "A056642",
            "A056642-01-07-1901-NA-CT-CHEST-PULMONARY-ANGIO-WITH-IV-CON-99467",
        ),
        ("COVIDCTMD-P055-IM0024", "COVIDCTMD-P055", "COVIDCTMD-P055"),
        ("COVIDCTMD-cap004-IM0070", "COVIDCTMD-cap004", "COVIDCTMD-cap004"),
        ("COVIDCTMD-normal075-IM0031", "COVIDCTMD-normal075", "COVIDCTMD-normal075"),
        ("unknown-scheme_0007", "unknown-scheme", "unknown-scheme"),
    ],
)
def test_covidx_patient_and_study_keys_from_published_file_names(name, patient, study):
    assert covidx_keys(name) == (patient, study, not name.startswith("unknown-scheme"))


def test_covidx_warns_when_a_patient_is_in_two_official_splits(covidx, caplog):
    listing = covidx / "test_COVIDx_CT-2A.txt"
    write_png(covidx / "2A_images" / "NCP_96_1400_0001.png")
    listing.write_text(listing.read_text() + "NCP_96_1400_0001.png 2 1 1 60 60\n")
    with caplog.at_level(logging.WARNING):
        samples = read_covidx(covidx)
    assert "1 patient(s) appear in more than one official split (first: NCP_96)" in caplog.text
    with pytest.raises(LeakError, match="NCP_96"):
        check_no_leak(samples)


@pytest.mark.parametrize(
    "line, message",
    [
        ("gone_0001.png 0 1 1 60 60", "1 listed image(s) missing, first: gone_0001.png"),
        ("NCP_7_20_0005.png 3 1 1 60 60", "test_COVIDx_CT-2A.txt:4: unknown class number '3'"),
        ("NCP_7_20_0005.png covid 1 1 60 60", "test_COVIDx_CT-2A.txt:4: unknown class number"),
        ("NCP_7_20_0005.png 2 1 1 60", "test_COVIDx_CT-2A.txt:4: expected 'filename class"),
        ("NCP_7_20_0005.png 2 a b c d", "test_COVIDx_CT-2A.txt:4: box 'a b c d' is not four"),
        ("NCP_7_20_0005.png 2 60 1 1 60", "test_COVIDx_CT-2A.txt:4: crop box (60, 1, 1, 60)"),
        ("../etc/x.png 2 1 1 60 60", "test_COVIDx_CT-2A.txt:4: file name '../etc/x.png'"),
    ],
)
def test_covidx_refuses_bad_lines(covidx, line, message):
    listing = covidx / "test_COVIDx_CT-2A.txt"
    listing.write_text(listing.read_text() + line + "\n")
    with pytest.raises(DatasetError, match=re.escape(message)):
        read_covidx(covidx)


def test_covidx_refuses_a_missing_split_file(covidx):
    (covidx / "val_COVIDx_CT-2A.txt").unlink()
    with pytest.raises(DatasetError, match=r"val_COVIDx_CT-2A.txt: missing \(COVIDx val split"):
        read_covidx(covidx)


def test_covidx_accepts_chosen_split_files_and_images_beside_them(covidx):
    for image in (covidx / "2A_images").iterdir():
        image.rename(covidx / image.name)
    (covidx / "2A_images").rmdir()
    samples = read_covidx(covidx, split_files={"test": "test_COVIDx_CT-2A.txt"})
    assert {s.split for s in samples} == {"test"}
    assert all(s.path.parent == covidx for s in samples)


# (split, file name, class number, patient, study): COVIDx CT-3A names of every source, as
# COVIDNet-CT's dataset_construction/ writes them, with the patient id metadata.csv lists.
COVIDX_3A_LINES = [
    ("train", "NCP_96_1328_0032.png", 2, "NCP_96", "NCP_96_1328"),
    ("train", "CP_1068_3064_0045.png", 1, "CP_1068", "CP_1068_3064"),
    ("train", "Normal_2011_293_0101.png", 0, "Normal_2011", "Normal_2011_293"),
    ("train", "137covid_patient100_SR_2_IM00028.png", 2, "patient100", "patient100_SR_2"),
    ("train", "HUST-Patient1314-0348.png", 2, "HUST-Patient1314", "HUST-Patient1314"),
    (
        "train",
        "radiopaedia_10_85902_1-0123.png",
        2,
        "radiopaedia_10_85902",
        "radiopaedia_10_85902_1",
    ),
    ("train", "coronacases_org_001-0123.png", 2, "coronacases_001", "coronacases_org_001"),
    (
        "train",
        "volume-covid19-A-0698_ct-0017.png",
        2,
        "volume-covid19-A-0698",
        "volume-covid19-A-0698_ct",
    ),
    ("train", "STOIC-10221-0076.png", 2, "STOIC-10221", "STOIC-10221"),
    ("train", "STOIC-10221-0080.png", 2, "STOIC-10221", "STOIC-10221"),
    (
        "train",
        "A002304-01-10-1901-NA-CT-ABD-AND-PELVIS-WITH-IV-CONT-76655-2-0001.png",
        2,
        "A002304",
        "A002304-01-10-1901-NA-CT-ABD-AND-PELVIS-WITH-IV-CONT-76655",
    ),
    (
        "train",
        "A002304-01-12-1901-NA-CT-CHEST-PULMONARY-ANGIO-WITH-IV-CON-70694-4-0039.png",
        2,
        "A002304",
        "A002304-01-12-1901-NA-CT-CHEST-PULMONARY-ANGIO-WITH-IV-CON-70694",
    ),
    (
        "train",
        "A383281-01-02-1901-NA-LUNG-PERFU-SION-IMAGING-58908-3-0013.png",
        2,
        "A383281",
        "A383281-01-02-1901-NA-LUNG-PERFU-SION-IMAGING-58908",
    ),
    ("train", "COVIDCTMD-P055-IM0024.png", 2, "COVIDCTMD-P055", "COVIDCTMD-P055"),
    ("val", "volume-covid19-A-0699-0041.png", 2, "volume-covid19-A-0699", "volume-covid19-A-0699"),
    (
        "val",
        f"LIDC-IDRI-0273-{LIDC_UID}-0093.png",
        0,
        "LIDC-IDRI-0273",
        f"LIDC-IDRI-0273-{LIDC_UID}",
    ),
    (
        "val",
        "radiopaedia-40860-43528-1-0012.png",
        1,
        "radiopaedia-40860",
        "radiopaedia-40860-43528",
    ),
    ("val", "COVIDCTMD-cap004-IM0070.png", 1, "COVIDCTMD-cap004", "COVIDCTMD-cap004"),
    ("test", "NCP_341_1834_0022.png", 2, "NCP_341", "NCP_341_1834"),
    ("test", "CP_5_3509_0130.png", 1, "CP_5", "CP_5_3509"),
    ("test", "COVIDCTMD-normal075-IM0031.png", 0, "COVIDCTMD-normal075", "COVIDCTMD-normal075"),
]
# Two slices of a source no rule knows (nor metadata.csv): keyed by the name, and reported.
COVIDX_3A_UNKNOWN = [("train", "future-source_0007.png", 0), ("train", "future-source_0008.png", 0)]
COVIDX_3A_METADATA = [
    "NCP_96,CNCB,China,,,COVID-19,Yes,Expert,Axial,CT",
    "CP_1068,CNCB,China,,,Pneumonia,Yes,Automatic,Axial,CT",
    "Normal_2011,CNCB,China,,,Normal,Yes,Expert,Axial,CT",
    "patient100,COVID-CTset,Iran,,,COVID-19,Yes,Non-expert,Axial,CT",
    "HUST-Patient1314,iCTCF,China,M,55,COVID-19,Yes,Automatic,Axial,CT",
    "radiopaedia_10_85902,Radiopaedia,,,,COVID-19,Yes,Expert,Axial,CT",
    "coronacases_001,coronacases.org,,,,COVID-19,Yes,Expert,Axial,CT",
    "volume-covid19-A-0698,COVID-19-20,,,,COVID-19,Yes,Expert,Axial,CT",
    "STOIC-10221,STOIC,France,F,55,COVID-19,Yes,Automatic,Axial,CT",
    "A002304,Stony Brook,USA,M,,COVID-19,Yes,Automatic,Axial,CT",
    "A383281,Stony Brook,USA,F,,COVID-19,Yes,Automatic,Axial,CT",
    "COVIDCTMD-P055,COVID-CT-MD,Iran,M,58,COVID-19,Yes,Automatic,Axial,CT",
    "volume-covid19-A-0699,TCIA,,,,COVID-19,Yes,Expert,Axial,CT",
    "LIDC-IDRI-0273,LIDC-IDRI,USA,,,Normal,Yes,Expert,Axial,CT",
    "radiopaedia-40860,Radiopaedia,,,,Pneumonia,Yes,Expert,Axial,CT",
    "COVIDCTMD-cap004,COVID-CT-MD,Iran,M,71,Pneumonia,Yes,Expert,Axial,CT",
    "NCP_341,CNCB,China,,,COVID-19,Yes,Expert,Axial,CT",
    "CP_5,CNCB,China,,,Pneumonia,Yes,Expert,Axial,CT",
    "COVIDCTMD-normal075,COVID-CT-MD,Iran,M,56,Normal,Yes,N/A,Axial,CT",
]


def write_covidx_3a(root: Path) -> Path:
    """A COVIDx CT-3A download: 3A_images/, <split>_COVIDx_CT-3A.txt and metadata.csv."""
    lines = [(split, name, number) for split, name, number, *_ in COVIDX_3A_LINES]
    for split in SPLITS:
        listed = [
            f"{name} {number} {number} 2 60 61"
            for where, name, number in [*lines, *COVIDX_3A_UNKNOWN]
            if where == split
        ]
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{split}_COVIDx_CT-3A.txt").write_text("\n".join(listed) + "\n")
    for _, name, number in [*lines, *COVIDX_3A_UNKNOWN]:
        write_png(root / "3A_images" / name, value=40 * number)
    (root / "metadata.csv").write_text("\n".join([METADATA_HEADER, *COVIDX_3A_METADATA]) + "\n")
    return root


@pytest.fixture
def covidx_3a(tmp_path) -> Path:
    return write_covidx_3a(tmp_path / "covidxct")


def metadata_ids(root: Path) -> set[str]:
    with open(root / "metadata.csv", newline="") as handle:
        return {row["patient id"] for row in csv.DictReader(handle)}


def test_covidx_3a_is_detected_and_read_with_its_splits_labels_and_boxes(covidx_3a):
    assert covidx_variant(covidx_3a) == "3A"
    samples = by_name(read_covidx(covidx_3a))

    assert len(samples) == len(COVIDX_3A_LINES) + len(COVIDX_3A_UNKNOWN)
    for split, name, number, _, _ in COVIDX_3A_LINES:
        sample = samples[name]
        assert (sample.split, sample.label) == (split, ("Normal", "Pneumonia", "Covid_19")[number])
        assert sample.path == covidx_3a / "3A_images" / name
        assert sample.box == (number, 2, 60, 61)
    assert samples["COVIDCTMD-cap004-IM0070.png"].slice_index == 70
    assert samples["STOIC-10221-0080.png"].slice_index == 80


def test_covidx_3a_patient_keys_of_every_source_are_metadata_patient_ids(covidx_3a, caplog):
    with caplog.at_level(logging.WARNING):
        samples = by_name(read_covidx(covidx_3a))

    listed = metadata_ids(covidx_3a)
    for _, name, _, patient, study in COVIDX_3A_LINES:
        assert (samples[name].patient, samples[name].study) == (patient, study)
        assert samples[name].patient in listed, name
    assert "not in metadata.csv" not in caplog.text
    stony_brook = [s for s in samples.values() if s.patient == "A002304"]
    assert len({s.study for s in stony_brook}) == 2, "two studies of one Stony Brook patient"


def test_covidx_3a_counts_patients_metadata_does_not_list(covidx_3a, caplog):
    metadata = covidx_3a / "metadata.csv"
    kept = [row for row in metadata.read_text().splitlines() if not row.startswith("STOIC-")]
    metadata.write_text("\n".join(kept) + "\n")
    with caplog.at_level(logging.WARNING):
        read_covidx(covidx_3a)
    assert (
        "1 patient key(s) parsed from file names are not in metadata.csv's 'patient id' column "
        "(first: STOIC-10221)"
    ) in caplog.text


def test_covidx_3a_names_no_rule_knows_are_reported_once_with_a_count(covidx_3a, caplog):
    with caplog.at_level(logging.WARNING):
        samples = by_name(read_covidx(covidx_3a))

    unknown = [r.getMessage() for r in caplog.records if "no known COVIDx scheme" in r.getMessage()]
    assert len(unknown) == 1
    assert (
        "2 file name(s) follow no known COVIDx scheme (first: future-source_0007.png"
        in (unknown[0])
    )
    assert samples["future-source_0007.png"].patient == "future-source"


def test_covidx_2a_is_detected_from_its_split_files(covidx):
    assert covidx_variant(covidx) == "2A"
    assert covidx_variant(covidx, "2A") == "2A"


def test_covidx_variant_prefers_the_complete_release_or_the_one_with_its_images(covidx_3a):
    (covidx_3a / "2A_images").mkdir()
    (covidx_3a / "train_COVIDx_CT-2A.txt").write_text("NCP_96_1328_0032.png 2 1 1 60 60\n")
    assert covidx_variant(covidx_3a) == "3A"  # 2A has one split file of three

    for split in SPLITS:
        (covidx_3a / f"{split}_COVIDx_CT-2A.txt").write_text("NCP_96_1328_0032.png 2 1 1 6 6\n")
    with pytest.raises(DatasetError, match=re.escape("both COVIDx CT-2A and CT-3A; choose one")):
        covidx_variant(covidx_3a)
    assert covidx_variant(covidx_3a, "2A") == "2A"

    (covidx_3a / "2A_images").rmdir()
    assert covidx_variant(covidx_3a) == "3A"  # both complete: only 3A_images/ is there


def test_covidx_variant_can_be_forced(covidx_3a):
    with pytest.raises(DatasetError, match=r"train_COVIDx_CT-2A.txt: missing \(COVIDx train"):
        read_covidx(covidx_3a, variant="2A")
    assert len(read_covidx(covidx_3a, variant="3A")) == len(read_covidx(covidx_3a))
    with pytest.raises(DatasetError, match="COVIDx variant '3B' is not one of auto, 2A, 3A"):
        read_covidx(covidx_3a, variant="3B")


def test_covidx_folder_without_split_files_names_the_files_looked_for(tmp_path):
    (tmp_path / "download" / "3A_images").mkdir(parents=True)
    with pytest.raises(DatasetError) as raised:
        read_covidx(tmp_path / "download")
    assert str(raised.value) == (
        f"{tmp_path / 'download'}: no COVIDx split files; looked for train_COVIDx_CT-3A.txt, "
        "val_COVIDx_CT-3A.txt, test_COVIDx_CT-3A.txt (CT-3A); train_COVIDx_CT-2A.txt, "
        "val_COVIDx_CT-2A.txt, test_COVIDx_CT-2A.txt (CT-2A)"
    )


@pytest.fixture
def export(tmp_path) -> Path:
    """A node export bundle: export.json, manifest.csv and images/<Class>/*.png."""
    return write_export(
        tmp_path / "export-2024-05-01",
        [("Covid_19", "a1f3"), ("Covid_19", "a1f3"), ("Normal", "b2e4"), ("Pneumonia", "c3d5")],
    )


def write_export(root: Path, images: list[tuple[str, str]]) -> Path:
    """An export bundle of one image per ``(label, patient pseudonym)``."""
    rows = [MANIFEST_HEADER]
    for i, (label, patient) in enumerate(images):
        path = f"images/{label}/{patient}{i:02d}.png"
        write_png(root / path, value=30 * i)
        rows.append(
            f"{path},{label},covid-{i},{patient},st{patient},se{patient},in{i},{i},-600,1500,node"
        )
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    counts = {label: sum(1 for found, _ in images if found == label) for label in CLASSES}
    info = {"format": "ainode-export/1", "counts": counts}
    (root / "export.json").write_text(json.dumps(info, indent=2))
    return root


def test_export_reads_every_manifest_row(export):
    samples = read_export(export)

    assert [s.label for s in samples] == ["Covid_19", "Covid_19", "Normal", "Pneumonia"]
    assert [s.patient for s in samples] == ["a1f3", "a1f3", "b2e4", "c3d5"]
    assert samples[0].study == "sta1f3"
    assert samples[3].slice_index == 3
    assert all(s.path.is_absolute() and s.path.is_file() for s in samples)
    assert {s.source for s in samples} == {"export:export-2024-05-01"}
    assert all(s.split is None for s in samples)


def _append_row(export: Path, path: str, label: str = "Normal") -> None:
    manifest = export / "manifest.csv"
    row = f"{path},{label},kw,p9,s9,se9,in9,,-600,1500,node\n"
    manifest.write_text(manifest.read_text() + row)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (
            lambda e: (e / "export.json").write_text('{"format": "ainode-export/2"}'),
            "export.json: format 'ainode-export/2' is not 'ainode-export/1'; refusing it",
        ),
        (lambda e: (e / "export.json").write_text("{}"), "format None is not 'ainode-export/1'"),
        (lambda e: (e / "export.json").write_text("{\n  oops"), "export.json:2: not valid JSON"),
        (lambda e: (e / "export.json").unlink(), "export.json: missing"),
        (lambda e: (e / "manifest.csv").unlink(), "manifest.csv: missing"),
        (lambda e: _append_row(e, "../outside.png"), "manifest.csv:6: path '../outside.png'"),
        (lambda e: _append_row(e, "images/../../x.png"), "leaves the bundle ('..' refused)"),
        (lambda e: _append_row(e, "/etc/passwd"), "manifest.csv:6: path '/etc/passwd' must be"),
        (lambda e: _append_row(e, "C:/x.png"), "path 'C:/x.png' must be relative"),
        (lambda e: _append_row(e, "images/Normal/gone.png"), "1 listed image(s) missing"),
        (
            lambda e: _append_row(e, "images/Normal/b2e402.png", label="Flu"),
            "manifest.csv:6: label 'Flu' is not one of Covid_19, Normal, Pneumonia",
        ),
        (
            lambda e: (e / "manifest.csv").write_text("path,label\nimages/x.png,Normal\n"),
            "manifest.csv:1: columns must be exactly path,label,keyword",
        ),
    ],
)
def test_export_refuses_bad_bundles(export, spoil, message):
    spoil(export)
    with pytest.raises(DatasetError, match=re.escape(message)):
        read_export(export)


def test_export_refuses_a_link_that_leaves_the_bundle(export, tmp_path):
    outside = write_png(tmp_path / "elsewhere" / "secret.png")
    (export / "images" / "Normal" / "link.png").symlink_to(outside)
    _append_row(export, "images/Normal/link.png")
    with pytest.raises(DatasetError, match="resolves outside the bundle"):
        read_export(export)


def make_class_folders(root: Path, names=("Covid_19", "NORMAL", "pneumonia")) -> Path:
    """The seed paper's layout: one folder per class, slices named <patient>_<slice>.png."""
    for folder, prefix in zip(names, ("C", "N", "P"), strict=True):
        for patient in range(3):
            for slice_index in range(2):
                write_png(root / folder / f"{prefix}{patient:03d}_{slice_index:03d}.png")
    write_png(root / ".thumbnails" / "ignored.png")
    (root / "README.txt").write_text("seed data")
    return root


def test_class_folders_with_a_patient_pattern(tmp_path, caplog):
    root = make_class_folders(tmp_path / "seed")
    with caplog.at_level(logging.WARNING):
        samples = read_class_folders(root, patient_pattern=r"^([CNP]\d+)_")

    assert len(samples) == 18
    assert caplog.text == ""
    assert {s.label for s in samples} == set(CLASSES)
    c000 = [s for s in samples if s.patient == "C000"]
    assert len(c000) == 2 and {s.label for s in c000} == {"Covid_19"}
    assert all(s.study == f"{s.patient}/{s.label}" for s in samples)  # one study per class
    assert {s.source for s in samples} == {"folders:seed"}


def test_class_folders_without_a_pattern_warn_and_keep_images_apart(tmp_path, caplog):
    root = make_class_folders(tmp_path / "seed")
    with caplog.at_level(logging.WARNING):
        samples = read_class_folders(root)

    assert len({s.patient for s in samples}) == len(samples) == 18
    assert "patient-level separation of train/val/test cannot be guaranteed" in caplog.text


@pytest.mark.parametrize("covid", ["COVID", "covid19", "Covid-19", "covid_19"])
def test_class_folders_accept_common_spellings(tmp_path, covid):
    root = make_class_folders(tmp_path / "seed", names=(covid, "normal", "Pneumonia"))
    samples = read_class_folders(root, patient_pattern=r"^(\w\d+)_")
    assert [s.label for s in samples if s.path.parent.name == covid] == ["Covid_19"] * 6


@pytest.mark.parametrize(
    "spoil, pattern, message",
    [
        (lambda r: (r / "Tuberculosis").mkdir(), None, "unknown class folder(s) Tuberculosis"),
        (lambda r: None, r"^[CNP]\d+_", "must have exactly one group, it has 0"),
        (lambda r: None, r"^(C\d+)_", "N000_000.png: file name does not match patient_pattern"),
        (lambda r: None, r"^([CNP]\d+_", "patient_pattern '^([CNP]\\\\d+_'"),
    ],
)
def test_class_folders_refuse_bad_input(tmp_path, spoil, pattern, message):
    root = make_class_folders(tmp_path / "seed")
    spoil(root)
    with pytest.raises(DatasetError, match=re.escape(message)):
        read_class_folders(root, patient_pattern=pattern)


def test_class_folders_refuse_a_folder_without_images(tmp_path):
    (tmp_path / "seed" / "Normal").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no .png/.jpg/.jpeg images"):
        read_class_folders(tmp_path / "seed")


def synthetic_samples(n_patients: int, seed: int = 0) -> list[Sample]:
    """Patients of random class, each with 1 to 40 slices, as CT studies have."""
    rng = random.Random(seed)
    samples = []
    for p in range(n_patients):
        label = rng.choice(CLASSES)
        for i in range(rng.randint(1, 40)):
            path = Path(f"/data/{label}/p{p}_{i}.png")
            samples.append(Sample(path, label, f"p{p}", f"p{p}-s", "synthetic", i))
    return samples


def patients_of(samples: list[Sample], split: str) -> set[str]:
    return {s.patient for s in samples if s.split == split}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_patients", [1, 2, 3, 10, 60, 250])
def test_split_by_patient_never_puts_a_patient_in_two_splits(seed, n_patients):
    samples = synthetic_samples(n_patients, seed=seed)
    split = split_by_patient(samples, seed=seed)

    assert [s.path for s in split] == [s.path for s in samples]
    assert all(s.split in SPLITS for s in split)
    check_no_leak(split)
    train, val, test = (patients_of(split, name) for name in SPLITS)
    assert not (train & val or train & test or val & test)
    assert train, "at least one patient is always kept for training"


def test_split_by_patient_puts_every_class_in_every_split():
    samples = [
        Sample(Path(f"/d/{label}{p}_{i}.png"), label, f"{label}{p}", f"{label}{p}", "s", i)
        for label in CLASSES
        for p in range(20)
        for i in range(5)
    ]
    counts = split_counts(split_by_patient(samples, val=0.15, test=0.15, seed=3))
    for label in CLASSES:
        assert counts["train"][label] == 14 * 5
        assert counts["val"][label] == 3 * 5
        assert counts["test"][label] == 3 * 5


@pytest.mark.parametrize("n_patients, expected", [(1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1))])
def test_split_by_patient_with_few_patients_per_class(n_patients, expected):
    samples = [
        Sample(Path(f"/d/{p}.png"), "Normal", f"p{p}", f"p{p}", "s") for p in range(n_patients)
    ]
    counts = split_counts(split_by_patient(samples))
    assert tuple(counts[split]["Normal"] for split in SPLITS) == expected


def test_split_by_patient_is_deterministic_for_a_seed():
    samples = synthetic_samples(200)
    first = split_by_patient(samples, seed=7)
    assert split_by_patient(samples, seed=7) == first
    assert split_by_patient(list(reversed(samples)), seed=7) == list(reversed(first))
    assert split_by_patient(samples, seed=8) != first


def test_split_by_patient_keeps_official_splits(covidx):
    samples = read_covidx(covidx)
    extra = Sample(Path("/d/NCP_96_1328_0099.png"), "Covid_19", "NCP_96", "NCP_96_1328", "x")
    new = Sample(Path("/d/new.png"), "Normal", "someone-else", "someone-else", "x")

    split = split_by_patient([*samples, extra, new])

    assert [s.split for s in split[: len(samples)]] == [s.split for s in samples]
    assert split[-2].split == "train", "a patient's unassigned slices join its official split"
    assert split[-1].split in SPLITS


def test_random_image_split_of_the_seed_paper_leaks_and_ours_does_not():
    samples = synthetic_samples(40, seed=1)
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    cut_val, cut_test = int(0.70 * len(shuffled)), int(0.85 * len(shuffled))
    seed_paper = [
        s.with_split("train" if i < cut_val else "val" if i < cut_test else "test")
        for i, s in enumerate(shuffled)
    ]
    with pytest.raises(LeakError, match=r"patient 'p\d+' is in splits"):
        check_no_leak(seed_paper)

    check_no_leak(split_by_patient(samples))


def test_check_no_leak_names_a_planted_leak():
    split = split_by_patient(synthetic_samples(30))
    victim = next(s for s in split if s.split == "train")
    planted = [s.with_split("test") if s == victim else s for s in split]
    with pytest.raises(LeakError, match=f"patient '{victim.patient}' is in splits test, train"):
        check_no_leak(planted)


def test_split_counts_cover_every_split_and_class():
    split = split_by_patient(synthetic_samples(50))
    counts = split_counts(split)
    assert list(counts) == list(SPLITS)
    assert all(list(per_class) == list(CLASSES) for per_class in counts.values())
    assert sum(n for per_class in counts.values() for n in per_class.values()) == len(split)
    assert split_counts(synthetic_samples(2))[None]


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (0.5, 0.5), (0.2, 1.0)])
def test_split_by_patient_refuses_impossible_fractions(val, test):
    with pytest.raises(ValueError, match="must be fractions that leave some train"):
        split_by_patient(synthetic_samples(5), val=val, test=test)


def write_keys(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_patient_keys_file_allows_comments_and_blank_lines(tmp_path):
    keys = write_keys(
        tmp_path / "holdout.txt",
        "# COVID-CT-MD patients of COVIDx CT-3A\n\nCOVIDCTMD-P055\n  COVIDCTMD-cap004  # CAP\n"
        "COVIDCTMD-P055\n",
    )
    assert read_patient_keys(keys) == {"COVIDCTMD-P055", "COVIDCTMD-cap004"}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "holdout.txt: missing (patient keys to exclude, one per line)"),
        (
            "COVIDCTMD-P055 COVIDCTMD-P056\n",
            "holdout.txt:1: 'COVIDCTMD-P055 COVIDCTMD-P056' is not",
        ),
        ("# nothing yet\n\n", "holdout.txt: no patient keys (one per line; '#' starts a comment)"),
        (b"\xff\xfeC\x00", "holdout.txt: not a UTF-8 text file of patient keys"),
    ],
)
def test_patient_keys_file_refuses_bad_content(tmp_path, content, message):
    path = tmp_path / "holdout.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=re.escape(message)):
        read_patient_keys(path)


def test_exclude_patients_keeps_every_other_image_in_order():
    samples = synthetic_samples(20)
    chosen = {"p3", "p7", "nobody"}
    kept, excluded = exclude_patients(samples, chosen)

    assert kept == [s for s in samples if s.patient not in chosen]
    assert {s.patient for s in excluded} == {"p3", "p7"}
    assert len(kept) + len(excluded) == len(samples)


def test_exclude_patients_refuses_to_exclude_everything():
    samples = synthetic_samples(2)
    with pytest.raises(ValueError) as raised:
        exclude_patients(samples, {"p0", "p1", "p9"})
    assert str(raised.value) == (
        f"excluding 3 patient key(s) leaves no images: all {len(samples)} image(s) of "
        "2 patient(s) are excluded"
    )


def prepare_args(out: Path, *sources: str) -> list[str]:
    return ["train", "prepare", *sources, "--out", str(out), "--image-size", "32", "--no-progress"]


@pytest.mark.parametrize(
    "fixture, kind", [("covidx", "covidx-ct-2a"), ("covidx_3a", "covidx-ct-3a")]
)
def test_prepare_records_which_covidx_release_it_read(request, tmp_path, fixture, kind):
    folder = request.getfixturevalue(fixture)
    assert main(prepare_args(tmp_path / "run", "--covidx", str(folder))) == 0
    info = json.loads((tmp_path / "run" / "prepare.json").read_text())
    assert [(s["kind"], s["images"]) for s in info["sources"]] == [(kind, len(read_covidx(folder)))]


def test_prepare_keeps_listed_patients_out_of_every_split(covidx_3a, tmp_path, capsys):
    # As the README says: the COVID-CT-MD patient ids from COVIDx's own metadata.csv.
    ctmd = [row.split(",")[0] for row in COVIDX_3A_METADATA if ",COVID-CT-MD," in row]
    keys = write_keys(tmp_path / "covid-ct-md.txt", "\n".join([*ctmd, "COVIDCTMD-P999"]) + "\n")
    run = tmp_path / "run"

    args = prepare_args(run, "--covidx", str(covidx_3a), "--exclude-patients", str(keys))
    assert main(args) == 0

    assert "excluded 3 image(s) of 3 patient(s); 1 of 4 listed key(s) matched no image" in (
        capsys.readouterr().out
    )
    prepared = read_samples(run / "samples.csv")
    assert not [s for s in prepared if s.patient.startswith("COVIDCTMD-")]
    assert len(prepared) == len(read_covidx(covidx_3a)) - 3
    info = json.loads((run / "prepare.json").read_text())
    assert info["sources"][-1] == {
        "kind": "excluded-patients",
        "files": [{"name": "covid-ct-md.txt", "sha256": sha256_of(keys)}],
        "exports": [],
        "keys": 4,
        "patients": 3,
        "images": 3,
    }


def test_prepare_keeps_the_patients_of_an_export_out(covidx_3a, tmp_path, capsys):
    site = write_export(
        tmp_path / "site",
        [("Covid_19", "a1f3"), ("Normal", "b2e4"), ("Normal", "b2e4"), ("Pneumonia", "c3d5")],
    )
    holdout = write_export(tmp_path / "holdout", [("Covid_19", "a1f3"), ("Normal", "f00d")])
    run = tmp_path / "run"

    sources = ["--covidx", str(covidx_3a), "--export", str(site), "--exclude-export", str(holdout)]
    assert main(prepare_args(run, *sources)) == 0

    assert "excluded 1 image(s) of 1 patient(s); 1 of 2 listed key(s) matched no image" in (
        capsys.readouterr().out
    )
    prepared = {s.patient for s in read_samples(run / "samples.csv")}
    assert {"b2e4", "c3d5"} <= prepared and "a1f3" not in prepared
    record = json.loads((run / "prepare.json").read_text())["sources"][-1]
    assert (record["exports"], record["patients"], record["images"]) == (["holdout"], 1, 1)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--exclude-patients", "{tmp}/absent.txt"], "absent.txt: missing (patient keys to"),
        (["--exclude-export", "{tmp}/absent"], "absent/export.json: missing"),
        (["--covidx-variant", "2A"], "train_COVIDx_CT-2A.txt: missing (COVIDx train split file)"),
        (
            ["--exclude-patients", "{tmp}/all.txt"],
            "leaves no images: all {images} image(s) of {patients} patient(s)",
        ),
    ],
)
def test_prepare_refuses_bad_exclusions_and_variants(covidx_3a, tmp_path, capsys, extra, message):
    samples = read_covidx(covidx_3a)
    patients = {s.patient for s in samples}
    write_keys(tmp_path / "all.txt", "\n".join(sorted(patients)) + "\n")
    args = prepare_args(tmp_path / "run", "--covidx", str(covidx_3a))
    assert main(args + [part.format(tmp=tmp_path) for part in extra]) == 2
    assert message.format(images=len(samples), patients=len(patients)) in capsys.readouterr().err
    assert not (tmp_path / "run" / "prepare.json").exists()
