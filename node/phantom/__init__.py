"""Deterministic synthetic chest-CT phantom: HU volumes, DICOM series and transfer syntaxes.

The package is split by concept:

- :mod:`~node.phantom.spec`: :class:`PhantomSpec`, its validation, scanner constants
- :mod:`~node.phantom.geometry`: the canonical patient frame, pixel grid, shape primitives
- :mod:`~node.phantom.anatomy`: tissue values, chest cavity, heart and lungs
- :mod:`~node.phantom.trees`: vessel and airway trees, great vessels, central airways
- :mod:`~node.phantom.raster`: drawing tubes with partial volume, blending tissue values
- :mod:`~node.phantom.render`: painting one axial slice
- :mod:`~node.phantom.findings`: the COVID-19 and pneumonia patterns
- :mod:`~node.phantom.volume`: the HU volume with scanner noise and blur
- :mod:`~node.phantom.dicom`: CT Image Storage datasets and their UIDs
- :mod:`~node.phantom.transfer`: transfer syntaxes and writing Part 10 files
- :mod:`~node.phantom.cli`: the ``ainode phantom`` command
"""

from __future__ import annotations

import shutil as shutil  # tests patch ``phantom.shutil.which`` to hide DCMTK

from node.phantom.cli import add_arguments, run
from node.phantom.dicom import generate_series
from node.phantom.geometry import _geometry as _geometry
from node.phantom.spec import _CHARSETS as _CHARSETS
from node.phantom.spec import CLASSES, PhantomSpec
from node.phantom.transfer import TRANSFER_SYNTAXES, encode_dataset, write_series
from node.phantom.volume import _lung_masks as _lung_masks
from node.phantom.volume import generate_hu_volume

__all__ = [
    "CLASSES",
    "TRANSFER_SYNTAXES",
    "PhantomSpec",
    "add_arguments",
    "encode_dataset",
    "generate_hu_volume",
    "generate_series",
    "run",
    "write_series",
]
