"""Runtimes on a CPU: ONNX Runtime FP32 and INT8 behind the agreement gate, cached per host.

Two bundles: the committed demo (EfficientNet-Lite0 @ 128), whose INT8 conversion does not
reproduce its answers, and a small convolutional model whose answers INT8 does reproduce
(built here from phantom slices: no training, so the test is quick).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ainode.cli import main  # noqa: E402
from node.analysis import gate, quantize, runtimes, threads  # noqa: E402
from node.analysis.analyze import analyze_instances  # noqa: E402
from node.analysis.bundle import BundleError, ModelBundle, ModelInfo, write_bundle  # noqa: E402
from node.analysis.gate_data import GATE_FILE, write_gate_data  # noqa: E402
from node.analysis.ood import sha256_of  # noqa: E402
from node.analysis.result import CLASSES  # noqa: E402
from node.records import registry  # noqa: E402
from node.settings import DEMO_MODEL_DIR, Settings  # noqa: E402
from tests.config import format1  # noqa: E402
from training.demo import study_slices  # noqa: E402

pytestmark = pytest.mark.filterwarnings(  # Keras 3.15 with NumPy 2, inside get_weights()
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

CACHES = ("model.int8.onnx", "runtimes.json")
# unseen by the demo (training.demo uses seeds 1000..1053), one role each
FIT_SEEDS, CALIBRATION_SEEDS, HOLDOUT_SEEDS, TEST_SEEDS = (9101, 9102), (9103,), (9104,), (9105,)
SIDE = 128


def copy_bundle(source: Path, target: Path, caches: bool = True) -> Path:
    """A private copy of a bundle; with ``caches``, the export, INT8 model and figures too."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and (caches or path.name not in CACHES):
            shutil.copy2(path, target / path.name)
    return target


def labelled(seeds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windowed lung slices of phantom studies (as training.demo labels them): images,
    class indices and study keys."""
    images, labels, studies = [], [], []
    for seed in seeds:
        for name, chosen in study_slices(seed, 30, SIDE).items():
            images += [image for _, image in chosen]
            labels += [CLASSES.index(name)] * len(chosen)
            studies += [f"{seed}/{name}"] * len(chosen)
    return np.stack(images), np.array(labels), np.array(studies)


def threshold_model(images: np.ndarray, labels: np.ndarray):
    """A convolutional model with the bundle contract whose answers are smooth functions of
    the image: box-filtered intensity above 32 thresholds, mixed by positive 3 x 3
    convolutions (enough of them that INT8 has work to speed up), averaged, and a linear
    head fitted to the labels in closed form (ridge regression)."""
    import keras

    rng = np.random.default_rng(0)
    inputs = keras.Input(shape=(None, None, 1), dtype="uint8", name="slices")
    x = keras.layers.Resizing(SIDE, SIDE)(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    layer = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")
    x = layer(x)
    layer.set_weights([np.full((3, 3, 1, 32), 1 / 9, "float32"), -np.linspace(0, 0.95, 32)])
    for filters, stride in ((64, 1), (64, 2), (128, 1), (128, 2)):
        weights = rng.random((3, 3, x.shape[-1], filters))
        layer = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", activation="relu")
        x = layer(x)
        layer.set_weights([weights / weights.sum(axis=(0, 1, 2)), np.zeros(filters)])
    features = keras.layers.GlobalAveragePooling2D()(x)
    features_of = keras.Model(inputs, features)
    found = features_of.predict(images[..., None], verbose=0).astype(np.float64)
    mean = found.mean(axis=0)
    centred = found - mean
    gram = centred.T @ centred
    targets = np.eye(len(CLASSES))[labels] * 6 - 3
    ridge = 0.1 * np.trace(gram) / len(gram)
    weights = np.linalg.solve(gram + ridge * np.eye(len(gram)), centred.T @ targets)
    head = keras.layers.Dense(len(CLASSES), activation="softmax", dtype="float32")
    outputs = head(features)
    head.set_weights([weights.astype("float32"), (-mean @ weights).astype("float32")])
    return keras.Model(inputs, outputs)


def write_gate(folder: Path, calibration: np.ndarray) -> None:
    """Gate data of phantom studies into ``folder`` (``calibration`` as given), named by
    its model.json."""
    holdout, _, _ = labelled(HOLDOUT_SEEDS)
    test, _, studies = labelled(TEST_SEEDS)
    summary = write_gate_data(folder / GATE_FILE, calibration, holdout, test, studies)
    info = ModelInfo.from_json(folder / "model.json")
    info.replace(gate=summary, format_version=2).to_json(folder / "model.json")


@pytest.fixture(scope="module")
def demo_gated(tmp_path_factory) -> tuple[Path, ModelBundle, str]:
    """A copy of the demo loaded with ``auto`` once (the export kept when the repository's
    demo has one): its folder, the bundle and what was logged."""
    folder = copy_bundle(DEMO_MODEL_DIR, tmp_path_factory.mktemp("demo") / "demo", caches=False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("node.analysis")
    logger.addHandler(handler)
    try:
        bundle = ModelBundle.load(folder, runtime="auto")
    finally:
        logger.removeHandler(handler)
    return folder, bundle, "\n".join(r.getMessage() for r in records)


@pytest.fixture(scope="module")
def gated_source(tmp_path_factory) -> Path:
    """The threshold model as a bundle with gate data, loaded with ``auto`` once (its INT8
    model and figures cached beside it)."""
    fit, labels, _ = labelled(FIT_SEEDS)
    calibration, _, _ = labelled(CALIBRATION_SEEDS)
    info = format1(ModelInfo.from_json(DEMO_MODEL_DIR / "model.json"))
    info = info.replace(name="threshold", version="1", demo=False, input_size=SIDE)
    folder = write_bundle(threshold_model(fit, labels), info, tmp_path_factory.mktemp("t") / "b")
    write_gate(folder, calibration)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtimes, "bf16_arithmetic", lambda: False)
        ModelBundle.load(folder, runtime="auto")
    return folder


@pytest.fixture
def gated(gated_source, tmp_path, monkeypatch) -> Path:
    """A private copy of the threshold bundle, its caches included, on a CPU without BF16
    arithmetic (simulated: most hospital servers), where ONNX Runtime INT8 is the fastest
    candidate; this host's OpenVINO BF16 is the threshold model's fastest (see
    :func:`test_auto_serves_openvino_bf16_where_the_cpu_has_it_and_it_passes`)."""
    monkeypatch.setattr(runtimes, "bf16_arithmetic", lambda: False)
    return copy_bundle(gated_source, tmp_path / "gated")


# ------------------------------------------------------------------------ the choice


def test_demo_int8_fails_the_gate_and_auto_serves_the_faster_fp32_runtime(demo_gated):
    folder, bundle, logged = demo_gated
    onnx, openvino, int8 = (bundle.gate[name] for name in ("onnx", "openvino", "onnx-int8"))
    for fp32 in (onnx, openvino):
        assert fp32["passed"] is True and fp32["agreement"] == 1.0
        assert fp32["max_diff"] < 1e-3 and fp32["studies_identical"]
    passing = [name for name, figures in bundle.gate.items() if figures["passed"]]
    fastest = min(passing, key=lambda name: bundle.gate[name]["seconds_per_slice"])
    assert bundle.runtime == fastest and bundle.batch_size == bundle.gate[fastest]["batch_size"]
    assert int8["passed"] is False
    assert int8["agreement"] < gate.MIN_AGREEMENT or int8["max_diff"] > gate.MAX_DIFFERENCE
    warning = next(line for line in logged.splitlines() if "onnx-int8 fails" in line)
    assert f"top-1 agreement {int8['agreement']:.2%}" in warning
    assert f"max probability difference {int8['max_diff']:.4f}" in warning
    assert bundle.batch_size in gate.BATCH_SIZES
    stored = json.loads((folder / "runtimes.json").read_text())
    assert stored["model_sha256"] == sha256_of(folder / "model.keras")
    ((host, gates),) = stored["gates"].items()
    assert gates["onnx-int8"]["agreement"] == int8["agreement"]
    assert f"| openvino {runtimes.openvino_version()}" in host  # a new OpenVINO gates again


def test_openvino_answers_every_batch_shape_as_onnx_runtime_does(demo_gated):
    folder, _, _ = demo_gated
    openvino = ModelBundle.load(folder, runtime="openvino")
    onnx = ModelBundle.load(folder, runtime="onnx")
    slices = labelled(TEST_SEEDS)[0][:7]
    assert openvino.runtime == "openvino"
    for batch_size in (1, 3, 7, 2):  # shapes compiled as they come, the oldest dropped
        probabilities, features = openvino.predict_with_features(slices, batch_size)
        expected, expected_features = onnx.predict_with_features(slices, batch_size)
        np.testing.assert_allclose(probabilities, expected, atol=1e-4)
        np.testing.assert_allclose(features, expected_features, atol=1e-3)


def test_without_openvino_auto_gates_the_others_and_a_request_for_it_is_refused(
    demo_gated, tmp_path, monkeypatch
):
    """A host where the openvino package is not installed (simulated)."""
    folder = copy_bundle(demo_gated[0], tmp_path / "demo")
    monkeypatch.setattr(runtimes, "openvino_version", lambda: None)
    bundle = ModelBundle.load(folder, runtime="auto")
    assert set(bundle.gate) == {"onnx", "onnx-int8"} and bundle.runtime == "onnx"
    for runtime in ("openvino", "openvino-bf16"):
        with pytest.raises(BundleError, match=f"the {runtime} runtime needs the openvino package"):
            ModelBundle.load(folder, runtime=runtime)


def test_openvino_bf16_is_a_candidate_only_where_the_cpu_computes_in_bf16(
    demo_gated, tmp_path, monkeypatch
):
    folder, bundle, _ = demo_gated
    if runtimes.bf16_arithmetic():  # this project's machines: AVX-512 BF16
        bf16 = bundle.gate["openvino-bf16"]
        assert bf16["studies_identical"] in (True, False) and "agreement" in bf16
        if not bf16["passed"]:
            assert bundle.runtime != "openvino-bf16"
            with pytest.raises(BundleError, match="openvino-bf16 fails the agreement gate"):
                ModelBundle.load(folder, runtime="openvino-bf16")
    copy = copy_bundle(folder, tmp_path / "demo")
    monkeypatch.setattr(runtimes, "bf16_arithmetic", lambda: False)  # an older CPU (simulated)
    assert "openvino-bf16" not in ModelBundle.load(copy, runtime="auto").gate
    with pytest.raises(BundleError, match="openvino-bf16 runtime needs a CPU with BF16"):
        ModelBundle.load(copy, runtime="openvino-bf16")


def test_onnx_int8_by_name_is_refused_with_the_figures(demo_gated):
    folder, _, _ = demo_gated
    with pytest.raises(
        BundleError, match=r"onnx-int8 fails the agreement gate against Keras FP32: "
    ):
        ModelBundle.load(folder, runtime="onnx-int8")


def test_auto_picks_int8_where_it_passes_the_gate_and_is_faster(gated):
    bundle = ModelBundle.load(gated, runtime="auto")
    int8 = bundle.gate["onnx-int8"]
    assert int8["passed"] and int8["agreement"] >= gate.MIN_AGREEMENT
    assert int8["max_diff"] <= gate.MAX_DIFFERENCE and int8["studies_identical"]
    for fp32 in (bundle.gate["onnx"], bundle.gate["openvino"]):
        assert fp32["passed"] and int8["seconds_per_slice"] < fp32["seconds_per_slice"]
    assert bundle.runtime == "onnx-int8" and bundle.batch_size == int8["batch_size"]
    slices = labelled(TEST_SEEDS)[0][:5]
    reference = ModelBundle.load(gated, runtime="keras").predict(slices)
    assert np.abs(bundle.predict(slices) - reference).max() <= gate.MAX_DIFFERENCE


def test_auto_serves_openvino_bf16_where_the_cpu_has_it_and_it_passes(gated, monkeypatch):
    monkeypatch.undo()  # this host's CPU as it is
    bundle = ModelBundle.load(gated, runtime="auto")
    if not runtimes.bf16_arithmetic():  # not this project's machines (AVX-512 BF16)
        assert "openvino-bf16" not in bundle.gate and bundle.runtime == "onnx-int8"
        return
    bf16 = bundle.gate["openvino-bf16"]
    assert bf16["passed"] and bf16["agreement"] >= gate.MIN_AGREEMENT
    assert 0 < bf16["max_diff"] <= gate.MAX_DIFFERENCE  # BF16 does round: never bit-identical
    passing = {name: figures for name, figures in bundle.gate.items() if figures["passed"]}
    assert bundle.runtime == min(passing, key=lambda name: passing[name]["seconds_per_slice"])
    slices = labelled(TEST_SEEDS)[0][:5]
    reference = ModelBundle.load(gated, runtime="keras").predict(slices)
    served = ModelBundle.load(gated, runtime="openvino-bf16")
    assert np.abs(served.predict(slices) - reference).max() <= gate.MAX_DIFFERENCE


def test_a_broken_quantisation_is_refused_and_auto_falls_back_to_fp32(gated, caplog):
    """Calibrated on blank images, INT8 cannot represent real ones: the gate refuses it."""
    for name in ("model.int8.onnx", "runtimes.json"):
        (gated / name).unlink()
    write_gate(gated, np.zeros((16, SIDE, SIDE), np.uint8))
    with caplog.at_level(logging.WARNING, logger="node.analysis"):
        bundle = ModelBundle.load(gated, runtime="auto")
    int8 = bundle.gate["onnx-int8"]
    assert bundle.runtime in ("onnx", "openvino") and not int8["passed"]
    assert f"top-1 agreement {int8['agreement']:.2%} < 99%" in int8["reason"]
    assert f"onnx-int8 fails the agreement gate, not used: {int8['reason']}" in caplog.text
    with pytest.raises(BundleError, match="onnx-int8 fails the agreement gate"):
        ModelBundle.load(gated, runtime="onnx-int8")


def test_a_conversion_that_runs_out_of_memory_is_not_held_against_the_runtime(
    gated, caplog, monkeypatch
):
    """Quantising a large model can exhaust a small host's memory (simulated: this host has
    the memory). The user sees why INT8 is not used; nothing is cached, so the next load,
    with the memory there, quantises, gates and serves INT8."""
    import onnxruntime.quantization

    for name in CACHES:
        (gated / name).unlink()

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 9.6 GiB for an array")

    with (
        monkeypatch.context() as patch,
        caplog.at_level(logging.WARNING, logger="node.analysis"),
    ):
        patch.setattr(onnxruntime.quantization, "quantize_static", no_memory)
        bundle = ModelBundle.load(gated, runtime="auto")
    int8 = bundle.gate["onnx-int8"]
    assert bundle.runtime in ("onnx", "openvino") and not int8["passed"]
    assert int8["reason"].startswith("conversion failed: INT8 quantisation failed (Unable to")
    assert "onnx-int8 not used: conversion failed" in caplog.text
    assert "(tried again at the next load)" in caplog.text
    cached = json.loads((gated / "runtimes.json").read_text())
    assert all("onnx-int8" not in host for host in cached["gates"].values())
    assert not (gated / "model.int8.onnx").exists()
    assert ModelBundle.load(gated, runtime="auto").runtime == "onnx-int8"


def test_conversion_and_gate_are_cached_and_made_again_when_model_keras_changes(gated, caplog):
    import keras

    (gated / "runtimes.json").unlink()
    (gated / "model.int8.onnx").unlink()
    with caplog.at_level(logging.INFO, logger="node.analysis"):
        ModelBundle.load(gated, runtime="auto")
    assert "quantising to INT8" in caplog.text
    stamps = {name: (gated / name).stat().st_mtime_ns for name in CACHES}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="node.analysis"):
        again = ModelBundle.load(gated, runtime="auto")
    assert "quantising" not in caplog.text and again.runtime == "onnx-int8"
    assert {name: (gated / name).stat().st_mtime_ns for name in CACHES} == stamps
    model = keras.saving.load_model(gated / "model.keras", compile=False)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel, bias + 0.01])
    model.save(gated / "model.keras")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="node.analysis"):
        ModelBundle.load(gated, runtime="auto")
    assert "quantising to INT8" in caplog.text and "exporting to ONNX" in caplog.text
    stored = json.loads((gated / "runtimes.json").read_text())
    assert stored["model_sha256"] == sha256_of(gated / "model.keras")
    assert quantize.cached_int8(gated, stored["model_sha256"], stored["gate_sha256"])


def int8_weights(folder: Path) -> np.ndarray:
    """The quantised convolution weights of ``folder``'s INT8 model, flattened."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model(folder / "model.int8.onnx")
    values = [
        numpy_helper.to_array(tensor).ravel()
        for tensor in model.graph.initializer
        if tensor.data_type == onnx.TensorProto.INT8
    ]
    return np.concatenate(values)


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_weights_are_8_bit_with_vnni_and_7_bit_without(gated, monkeypatch, caplog, vnni):
    """Without VNNI, ONNX Runtime's x86 kernels sum pairs of uint8 x int8 products in 16
    bits, which saturate: the weights then take 7 bits. The INT8 model and the gate's
    figures say which recipe, so a bundle moved to another CPU is quantised and gated again."""
    for name in CACHES:
        (gated / name).unlink()
    monkeypatch.setattr(quantize, "int8_dot_products", lambda: vnni)
    with caplog.at_level(logging.INFO, logger="node.analysis"):
        bundle = ModelBundle.load(gated, runtime="auto")
    bits, recipe, largest = (8, "qdq-u8s8-", 127) if vnni else (7, "qdq-u8s7-", 64)
    assert f"calibration slices ({bits}-bit weights" in caplog.text
    # symmetric per channel: each channel's largest weight is the range's end, 127 or 64
    assert np.abs(int8_weights(gated).astype(np.int16)).max() == largest
    stored = json.loads((gated / "runtimes.json").read_text())
    assert any(recipe in key for key in stored["gates"]) and quantize.recipe().startswith(recipe)
    assert "onnx-int8" in bundle.gate
    caplog.clear()
    monkeypatch.setattr(quantize, "int8_dot_products", lambda: not vnni)  # another CPU
    with caplog.at_level(logging.INFO, logger="node.analysis"):
        ModelBundle.load(gated, runtime="auto")
    assert f"({15 - bits}-bit weights" in caplog.text


def test_cpu_flags_tell_vnni_from_the_cpu_description():
    avx2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2\n"
    vnni = avx2.replace("avx2", "avx2 avx512f avx512_vnni")
    assert "avx2" in quantize.cpu_flags(avx2)
    assert not quantize.cpu_flags(avx2) & quantize.VNNI_FLAGS
    assert quantize.cpu_flags(vnni) & quantize.VNNI_FLAGS == {"avx512_vnni"}
    assert quantize.cpu_flags("model name : unknown\n") == frozenset()


def test_a_bundle_the_node_cannot_write_keeps_the_figures_in_memory(gated, caplog):
    """(Tests run as root, whom permissions do not stop: the cache names are taken by
    folders, so every write fails as on a read-only mount.)"""
    for name in CACHES:
        (gated / name).unlink()
        (gated / name).mkdir()
    with caplog.at_level(logging.INFO, logger="node.analysis"):
        first = ModelBundle.load(gated, runtime="auto")
    assert "cannot cache the INT8 model" in caplog.text
    assert "the gate's figures are kept in memory" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="node.analysis"):
        again = ModelBundle.load(gated, runtime="auto")
    assert again.runtime == first.runtime == "onnx-int8" and again.gate == first.gate
    assert "kept in memory" not in caplog.text and "quantising" not in caplog.text


def test_a_bundle_without_gate_data_is_served_as_before(format1_bundle_dir, demo_gated, caplog):
    folder, _, _ = demo_gated
    exported = folder / "model.onnx"
    if not (format1_bundle_dir / "model.onnx").exists():
        shutil.copy2(exported, format1_bundle_dir / "model.onnx")  # the same model.keras
    with caplog.at_level(logging.INFO, logger="node.analysis"):
        old = ModelBundle.load(format1_bundle_dir, runtime="auto")
    assert old.runtime == "onnx" and old.gate == {} and old.batch_size == 16
    assert "no gate data in the bundle: serving ONNX Runtime FP32" in caplog.text
    with pytest.raises(BundleError, match="no gate data .*onnx-int8 needs"):
        ModelBundle.load(format1_bundle_dir, runtime="onnx-int8")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sha256": "0" * 64}, "gate.npz: SHA-256 differs from model.json's gate.sha256"),
        ({"file": "../gate.npz"}, "gate.file must be a file name in the bundle"),
        ({"file": "other.npz"}, "other.npz: missing"),
    ],
)
def test_bad_gate_entries_are_refused(gated, change, message):
    data = json.loads((gated / "model.json").read_text())
    data["gate"].update(change)
    (gated / "model.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"model.json: gate: .*{message}"):
        ModelBundle.load(gated, runtime="keras")


# ------------------------------------------------------------------------ answers


def test_study_answers_are_identical_between_runtimes_on_a_phantom_study(demo_gated, chest_series):
    folder, served, _ = demo_gated
    _, paths = chest_series
    keras = analyze_instances(paths, ModelBundle.load(folder, runtime="keras")).result
    assert served.runtime in ("onnx", "openvino")
    for runtime in ("onnx", "openvino"):
        other = analyze_instances(paths, ModelBundle.load(folder, runtime=runtime)).result
        assert other.predicted_class == keras.predicted_class == "Covid_19"
        np.testing.assert_allclose(other.probabilities, keras.probabilities, atol=1e-4)
        assert other.ood["flagged"] == keras.ood["flagged"]
        assert other.decision["method"] == keras.decision["method"] == "operating point"


def study_answers_of(bundle: ModelBundle, images: np.ndarray, studies: np.ndarray) -> dict:
    """Per study, the class the node reports under each rule (and the OOD flag)."""
    probabilities, features = bundle.predict_with_features(images)
    answers = gate.Answers(probabilities[:0], probabilities, features)
    return gate.study_answers(answers, studies, bundle.info, bundle.ood_statistics)


def test_int8_study_answers_match_keras_on_unseen_phantom_studies(gated):
    int8 = ModelBundle.load(gated, runtime="onnx-int8")
    keras = ModelBundle.load(gated, runtime="keras")
    images, _, studies = labelled((9201, 9202))
    assert int8.runtime == "onnx-int8"
    assert study_answers_of(int8, images, studies) == study_answers_of(keras, images, studies)


# ------------------------------------------------------------------------ threads


def test_sessions_use_the_threads_given_and_one_inter_op_thread(gated):
    one = ModelBundle.load(gated, runtime="auto", threads=1).session_options
    assert (one.intra_op_num_threads, one.inter_op_num_threads) == (1, 1)
    shared = ModelBundle.load(gated, runtime="onnx").session_options
    expected = max(1, threads.available_cpus() // threads.model_workers_on_host())
    assert shared.intra_op_num_threads == expected
    assert ModelBundle.load(gated, runtime="keras").session_options is None


def _process(proc: Path, pid: int, *argv: str) -> None:
    (proc / str(pid)).mkdir()
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_analysis_workers_share_the_cores(tmp_path, monkeypatch):
    """serve's uploads worker (one uploaded image now and then) does not halve the analysis
    worker's cores; two analysis workers on one host split them."""
    python = "/srv/venv/bin/python"
    _process(tmp_path, 10, python, "-m", "ainode.cli", "serve")
    _process(tmp_path, 11, python, "-m", "ainode.cli", "worker", "--queues=analysis,exports",
             "--parent-pid=10")  # fmt: skip
    _process(tmp_path, 12, python, "-m", "ainode.cli", "worker", "--queues=reports,uploads",
             "--parent-pid=10")  # fmt: skip
    _process(tmp_path, 13, "/srv/venv/bin/ainode", "worker", "--queues", "reports")
    _process(tmp_path, 14, "/usr/bin/vim", "worker")
    (tmp_path / "self").mkdir()
    assert threads.model_workers_on_host(tmp_path) == 1
    _process(tmp_path, 15, "/srv/venv/bin/ainode", "-c", "/etc/ainode.toml", "worker")
    assert threads.model_workers_on_host(tmp_path) == 2
    _process(tmp_path, 16, "/srv/venv/bin/ainode", "worker", "--queues", "analysis")
    assert threads.model_workers_on_host(tmp_path) == 3
    assert threads.model_workers_on_host(tmp_path / "nothing") == 1
    monkeypatch.setattr(threads, "model_workers_on_host", lambda: 3)
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    assert threads.intra_op_threads(0) == 2 and threads.intra_op_threads(5) == 5
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    assert threads.intra_op_threads(0) == 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model_runtime", "int8", "String should match pattern"),
        ("model_threads", -1, "greater than or equal to 0"),
    ],
)
def test_settings_refuse_a_bad_runtime_or_thread_count(field, value, message):
    with pytest.raises(ValueError, match=message):
        Settings(**{field: value})
    assert Settings(model_runtime="onnx-int8", model_threads=2).model_threads == 2


# ------------------------------------------------------------------------ activation


def test_activate_runs_the_gate_with_a_progress_bar_and_prints_the_figures(
    make_node, demo_gated, monkeypatch, capsys
):
    node = make_node()
    settings = node.settings
    folder = registry.bundle_folder(settings, "covid-ct", "1.0")
    copy_bundle(demo_gated[0], folder)
    (folder / "runtimes.json").unlink()  # the gate and timing run again at activation
    info = ModelInfo.from_json(folder / "model.json").replace(name="covid-ct", version="1.0")
    info.to_json(folder / "model.json")
    monkeypatch.setenv("AINODE_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("AINODE_DATABASE_URL", settings.database_url)
    assert main(["models", "activate", "covid-ct:1.0", "--by", "dr.cli"]) == 0
    out, err = capsys.readouterr()
    assert "activated covid-ct:1.0" in out
    served = ModelBundle.load(folder, runtime="auto")  # from the figures activate cached
    assert served.runtime in ("onnx", "openvino")
    assert f"runtime: {served.runtime} (model_runtime auto), batch {served.batch_size}" in out
    assert "onnx passes: top-1 agreement 100.00% (gate: >= 99%)" in out
    assert "openvino passes: top-1 agreement 100.00% (gate: >= 99%)" in out
    assert "onnx-int8 fails (top-1 agreement" in out or "onnx-int8 fails (max probability" in out
    assert "Keras FP32 reference answers" in err and "step" in err  # the progress bar
    assert (folder / "runtimes.json").is_file()
