"""The export bundle contract: what ``ainode`` writes and ``ainode train prepare`` reads.

A bundle is ``images/<Class>/<key>.png``, ``manifest.csv`` (one row per image, exactly
these columns, in this order) and ``export.json`` (``format`` first of all). The writer
(:mod:`node.records.export`) and the reader (:mod:`training.datasets`) both import these
names, so the two sides cannot drift apart.
"""

from __future__ import annotations

FORMAT = "ainode-export/1"  # export.json "format"; a reader refuses any other
INFO_FILE = "export.json"
MANIFEST_FILE = "manifest.csv"
IMAGES_FOLDER = "images"
MANIFEST_COLUMNS = (
    "path",  # relative to the bundle: images/<Class>/<key>.png
    "label",  # one of the node's classes
    "keyword",  # the radiologist's keyword the label came from
    "patient",  # pseudonyms (salted hashes): split by patient without knowing who
    "study",
    "series",
    "instance",
    "slice_index",
    "window_center",
    "window_width",
    "source",
)
