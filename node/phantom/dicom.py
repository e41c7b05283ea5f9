"""CT Image Storage datasets: deterministic UIDs and the patient, study and image modules."""

from __future__ import annotations

import copy
import datetime
import uuid

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.phantom.geometry import _Geometry
from node.phantom.spec import _INTERCEPT, _MANUFACTURER, _PADDING_STORED, _Z_TOP, PhantomSpec
from node.phantom.volume import _render_volume


def _derived_uid(*parts: object) -> str:
    """A 2.25 UID from a name-based (SHA-1, version 5) UUID of its inputs: stable per spec.

    ``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its entropy sources and returns
    a random UUID, so it cannot be used for reproducible UIDs.
    """
    name = "\x1f".join(["ainode-phantom", *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _series_uids(spec: PhantomSpec) -> tuple[str, str, str]:
    """Study, series and frame-of-reference UIDs."""
    # Everything that changes the pixels or identifies the study goes in, so two different
    # phantoms never share a UID.
    content = (spec.finding, spec.seed, spec.slices, spec.rows, spec.columns)
    identity = (spec.patient_id, spec.patient_name, spec.accession_number, spec.study_date)
    study = spec.study_instance_uid or _derived_uid("study", *content, *identity, spec.study_time)
    series = spec.series_instance_uid or _derived_uid("series", study, *content)
    return study, series, _derived_uid("frame-of-reference", series)


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters with no binary-float noise."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _later(date: str, time: str, seconds: float) -> tuple[str, str]:
    moment = datetime.datetime.strptime(date + time, "%Y%m%d%H%M%S")
    moment += datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f")[:10]


def _patient_age(spec: PhantomSpec) -> str:
    birth = datetime.datetime.strptime(spec.patient_birth_date, "%Y%m%d").date()
    study = datetime.datetime.strptime(spec.study_date, "%Y%m%d").date()
    years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    return f"{min(years, 999):03d}Y"


def _patient_and_study(ds: Dataset, spec: PhantomSpec, study_uid: str) -> None:
    """Patient, General Study and Patient Study modules."""
    ds.SpecificCharacterSet = spec.charset
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    if spec.patient_birth_date:
        ds.PatientAge = _patient_age(spec)
    ds.PatientWeight = "72"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = spec.accession_number
    ds.StudyDescription = spec.study_description


def _series_and_equipment(ds: Dataset, spec: PhantomSpec, series_uid: str, frame_uid: str) -> None:
    """General Series, Frame of Reference and General Equipment modules."""
    series_date, series_time = _later(spec.study_date, spec.study_time, 120)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2
    ds.SeriesDate, ds.SeriesTime = series_date, series_time
    ds.SeriesDescription = spec.series_description
    ds.ProtocolName = "CHEST ROUTINE"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = "ainode"
    ds.StationName = "PHANTOMCT"
    ds.ManufacturerModelName = "Synthetic Chest CT"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1.0"
    ds.add_new(0x00280120, "SS", _PADDING_STORED)  # PixelPaddingValue, signed like the pixels


def _acquisition(ds: Dataset, geom: _Geometry) -> None:
    """CT acquisition and reconstruction parameters of a routine helical chest scan."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ScanOptions = "HELICAL MODE"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds(geom.pixel_spacing * min(geom.rows, geom.columns))
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = 200
    ds.Exposure = 100
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = 24
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "STANDARD"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    ds.SpiralPitchFactor = 0.984375
    ds.CTDIvol = 8.5
    phantom_type = Dataset()  # CTDIvol is only meaningful with its reference phantom
    phantom_type.CodeValue = "113691"
    phantom_type.CodingSchemeDesignator = "DCM"
    phantom_type.CodeMeaning = "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = [phantom_type]
    ds.AcquisitionNumber = 1
    ds.ImagesInAcquisition = len(geom.depths)


def _image(ds: Dataset, geom: _Geometry) -> None:
    """Image Plane, Image Pixel, CT Image rescale and VOI LUT attributes."""
    ds.PixelSpacing = [_ds(geom.pixel_spacing)] * 2
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceThickness = _ds(geom.thickness)
    ds.SpacingBetweenSlices = _ds(geom.thickness)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = geom.rows, geom.columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = str(_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"


def _slice_dataset(template: Dataset, geom: _Geometry, index: int, pixels: np.ndarray) -> Dataset:
    """One slice: the shared attributes plus position, numbering, UIDs and pixel data."""
    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = _derived_uid("instance", ds.SeriesInstanceUID, index)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = index + 1
    z = _Z_TOP - index * geom.thickness  # head first: z falls towards the feet
    origin_x = -geom.pixel_spacing * (geom.columns - 1) / 2
    origin_y = -geom.pixel_spacing * (geom.rows - 1) / 2
    ds.ImagePositionPatient = [_ds(origin_x), _ds(origin_y), _ds(z)]
    ds.SliceLocation = _ds(z)
    # A 0.5 s rotation at pitch ~1 covers 40 mm: the acquisition time moves along the scan.
    date, time = _later(ds.SeriesDate, ds.SeriesTime[:6], 2.0 + index * geom.thickness / 78.75)
    ds.AcquisitionDate, ds.AcquisitionTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.SmallestImagePixelValue = int(pixels.min())
    ds.LargestImagePixelValue = int(pixels.max())
    ds.add_new(0x7FE00010, "OW", pixels.astype("<i2").tobytes())
    return ds


def _template(spec: PhantomSpec, geom: _Geometry) -> Dataset:
    study_uid, series_uid, frame_uid = _series_uids(spec)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.InstanceCreationDate, ds.InstanceCreationTime = spec.study_date, spec.study_time
    _patient_and_study(ds, spec, study_uid)
    _series_and_equipment(ds, spec, series_uid, frame_uid)
    _acquisition(ds, geom)
    _image(ds, geom)
    return ds


def generate_series(spec: PhantomSpec) -> list[Dataset]:
    """CT Image Storage datasets, one per slice, top first, in Explicit VR Little Endian.

    Stored pixel values are HU + 1024 as int16 (Rescale Intercept -1024); pixels outside the
    circular field of view hold the Pixel Padding Value -2000.
    """
    volume, geom = _render_volume(spec)
    stored = (volume - _INTERCEPT).clip(-32768, 32767).astype(np.int16)
    template = _template(spec, geom)
    return [_slice_dataset(template, geom, i, stored[i]) for i in range(spec.slices)]
