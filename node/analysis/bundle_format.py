"""What a model bundle is, in names the training side, the node and its settings share.

The files of a bundle and what the node caches beside them, the ``model.json`` format version,
the preprocessing and input sizes the node knows, and the runtimes that can serve a bundle.
Plain constants without imports, so :mod:`node.settings` reads them without loading NumPy.
"""

# Must equal node.analysis.imaging.PREPROCESSING_VERSION (a test checks); a new version of the pixel
# pipeline means old bundles are refused rather than fed pixels they were not trained on.
PREPROCESSING_VERSIONS = frozenset({"hu-window-uint8/1"})
# what ModelBundle.load and the model_runtime setting accept (node.analysis.bundle)
RUNTIMES = ("auto", "keras", "onnx", "onnx-int8", "openvino", "openvino-bf16")
INPUT_SIZE_RANGE = (32, 1024)
MODEL_FILE, INFO_FILE, ONNX_FILE = "model.keras", "model.json", "model.onnx"
INT8_FILE = "model.int8.onnx"  # node.analysis.quantize
# what the node derives from a bundle on its host: never carried into a rewritten bundle
CACHE_FILES = (ONNX_FILE, INT8_FILE, "runtimes.json")
# model.json's format: 1 (no field) = class, probabilities, model identity; 2 adds what makes
# an answer checkable — calibration, operating point, out-of-distribution statistics. A bundle
# of format 1 is still served: uncalibrated, the most probable class, no OOD warning.
BUNDLE_FORMAT = 2
