"""The model registry: listing, activation, the pinned model_dir, workers and classify follow."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ainode.cli import main  # noqa: E402
from node import phantom  # noqa: E402
from node.analysis import imaging  # noqa: E402
from node.analysis.bundle import BundleError, ModelInfo  # noqa: E402
from node.records import registry  # noqa: E402
from node.records.db import ModelActivation  # noqa: E402
from node.runtime import build_node  # noqa: E402
from node.workflow import tasks  # noqa: E402

pytestmark = pytest.mark.filterwarnings(  # Keras 3.15 with NumPy 2, inside get_weights()
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

DEMO = registry.BUILTIN_DIR
DEMO_REF = "ainode-demo-phantom:0.4.0"


@pytest.fixture(scope="module", autouse=True)
def demo_onnx_cached():
    """The demo's ONNX export, INT8 conversion and agreement gate made once, so that copies
    of it activate without making them again."""
    from node.analysis.bundle import ModelBundle

    ModelBundle.load(DEMO, runtime="auto")


def add_bundle(settings, name: str, version: str, **fields) -> Path:
    """A registry bundle copied from the demo, its model.json renamed (no training)."""
    folder = registry.bundle_folder(settings, name, version)
    shutil.copytree(DEMO, folder)
    info = ModelInfo.from_json(folder / "model.json")
    changed = info.replace(name=name, version=version, demo=False, **fields)
    changed.to_json(folder / "model.json")
    return folder


@pytest.fixture
def node(make_settings, database_url):
    """A migrated node on SQLite and on PostgreSQL."""
    built = build_node(make_settings(database_url=database_url), migrate=True)
    yield built
    built.close()


def activate(node, ref: str, by: str = "dr.test") -> registry.RegisteredModel:
    with node.session_factory() as session, session.begin():
        return registry.activate(node.settings, session, ref, by)


def active_dir(node) -> Path:
    with node.session_factory() as session:
        return registry.active_model_dir(node.settings, session)


def listed(node) -> dict[str, registry.RegisteredModel]:
    with node.session_factory() as session:
        return {m.ref: m for m in registry.list_models(node.settings, session)}


def test_demo_is_built_in_and_active_when_nothing_was_activated(node):
    models = listed(node)
    assert list(models) == [DEMO_REF]
    demo = models[DEMO_REF]
    assert demo.builtin and demo.active and not demo.pinned and demo.info.demo
    assert active_dir(node) == DEMO


def test_activate_moves_the_active_model_and_keeps_the_history(node):
    first = add_bundle(node.settings, "covid-ct", "1.0")
    second = add_bundle(node.settings, "covid-ct", "2.0")
    assert activate(node, "covid-ct:1.0").active
    assert active_dir(node) == first
    activate(node, "covid-ct:2.0", by="dr.house")
    assert active_dir(node) == second
    models = listed(node)
    assert [ref for ref, m in models.items() if m.active] == ["covid-ct:2.0"]
    assert not models[DEMO_REF].active
    activate(node, DEMO_REF)  # going back to the demo is an activation too
    assert active_dir(node) == DEMO
    with node.session_factory() as session:
        history = session.execute(
            select(
                ModelActivation.name, ModelActivation.version, ModelActivation.activated_by
            ).order_by(ModelActivation.id)
        ).all()
    assert [tuple(row) for row in history] == [
        ("covid-ct", "1.0", "dr.test"),
        ("covid-ct", "2.0", "dr.house"),
        ("ainode-demo-phantom", "0.4.0", "dr.test"),
    ]


@pytest.mark.parametrize(
    ("ref", "error", "message"),
    [
        ("covid-ct:9.9", LookupError, "no model covid-ct:9.9"),
        ("other:1.0", LookupError, "known: covid-ct:1.0, ainode-demo-phantom:0.4.0"),
        ("covid-ct", ValueError, "give the model as NAME:VERSION"),
        ("../x:1.0", ValueError, "model name must be"),
        ("a/b:1.0", ValueError, "model name must be"),
        (".hidden:1.0", ValueError, "model name must be"),
        (":1.0", ValueError, "model name must be"),
        ("covid-ct:", ValueError, "model version must be"),
        ("covid-ct:../../etc", ValueError, "model version must be"),
    ],
)
def test_activate_refuses_unknown_and_unsafe_names(settings, ref, error, message):
    built = build_node(settings, migrate=True)
    add_bundle(settings, "covid-ct", "1.0")
    with pytest.raises(error, match=message.replace(".", r"\.")):
        activate(built, ref)
    assert active_dir(built) == DEMO
    built.close()


@pytest.mark.parametrize(
    ("name", "version"), [("../x", "1"), ("a/b", "1"), (".hidden", "1"), ("", "1"), ("ok", "..")]
)
def test_bundle_folder_refuses_unsafe_components(settings, name, version):
    with pytest.raises(ValueError, match="must be 1-"):
        registry.bundle_folder(settings, name, version)


def test_bundle_with_unknown_preprocessing_is_listed_with_its_error_and_refused(node):
    folder = add_bundle(node.settings, "future", "1.0")
    data = json.loads((folder / "model.json").read_text())
    data["preprocessing_version"] = "hu-window-uint8/99"
    (folder / "model.json").write_text(json.dumps(data))
    broken = listed(node)["future:1.0"]
    assert (
        broken.info is None
        and "node knows (hu-window-uint8/1), got 'hu-window-uint8/99'" in broken.error
    )
    with pytest.raises(
        BundleError, match="future:1.0 cannot be activated: .*must be a version this node knows"
    ):
        activate(node, "future:1.0")
    assert active_dir(node) == DEMO


def test_bundle_whose_model_json_names_another_model_is_refused(settings):
    built = build_node(settings, migrate=True)
    folder = add_bundle(settings, "covid-ct", "1.0")
    shutil.move(folder, folder.with_name("1.1"))
    assert "registered as covid-ct:1.1" in listed(built)["covid-ct:1.1"].error
    with pytest.raises(BundleError, match="names covid-ct:1.0 but the bundle is registered"):
        activate(built, "covid-ct:1.1")
    built.close()


def test_active_bundle_whose_folder_vanished_is_a_clear_error(settings):
    built = build_node(settings, migrate=True)
    folder = add_bundle(settings, "covid-ct", "1.0")
    activate(built, "covid-ct:1.0", by="dr.gone")
    shutil.rmtree(folder)
    with pytest.raises(BundleError, match="active model covid-ct:1.0 .*dr.gone.* no folder"):
        active_dir(built)
    gone = listed(built)["covid-ct:1.0"]
    assert gone.active and "the bundle folder is gone" in gone.error
    built.close()


def test_pinned_model_dir_wins_and_activate_warns(make_settings, monkeypatch, capsys):
    plain = make_settings()
    pinned_dir = add_bundle(plain, "pinned", "1.0")
    add_bundle(plain, "covid-ct", "1.0")
    settings = make_settings(model_dir=pinned_dir)
    build_node(settings, migrate=True).close()
    use_cli(monkeypatch, settings)
    assert main(["models", "activate", "covid-ct:1.0", "--by", "dr.pin"]) == 0
    captured = capsys.readouterr()
    assert "activated covid-ct:1.0" in captured.out
    assert "warning: model_dir is set" in captured.err and "pins the served model" in captured.err
    built = build_node(settings)
    assert active_dir(built) == pinned_dir
    models = listed(built)
    assert models["pinned:1.0"].active and models["pinned:1.0"].pinned
    assert not models["covid-ct:1.0"].active
    built.close()


def test_worker_reloads_only_when_the_active_model_changes(settings):
    built = build_node(settings, migrate=True)
    app = SimpleNamespace(conf=SimpleNamespace())  # the worker's settings are not in its conf
    tasks.use_settings(settings)
    try:
        _node, first = tasks.worker_state(app)
        assert first.info.identity().name == "ainode-demo-phantom"
        assert tasks.worker_state(app)[1] is first  # nothing changed: no reload
        folder = add_bundle(settings, "covid-ct", "1.0")
        activate(built, "covid-ct:1.0")
        second = tasks.worker_state(app)[1]
        assert (second.info.name, second.info.version) == ("covid-ct", "1.0")
        assert tasks.worker_state(app)[1] is second
        info = ModelInfo.from_json(folder / "model.json")  # the bundle rewritten in place
        info.replace(description="retrained").to_json(folder / "model.json")
        third = tasks.worker_state(app)[1]
        assert third is not second and third.info.description == "retrained"
    finally:
        tasks._worker.clear()
        tasks._configured.clear()
        built.close()


def use_cli(monkeypatch, settings) -> None:
    """Point ``ainode`` (which reads AINODE_* variables) at these settings."""
    monkeypatch.setenv("AINODE_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("AINODE_DATABASE_URL", settings.database_url)
    if settings.model_dir:
        monkeypatch.setenv("AINODE_MODEL_DIR", str(settings.model_dir))


def test_models_list_and_activate_commands(node, monkeypatch, capsys):
    use_cli(monkeypatch, node.settings)
    add_bundle(node.settings, "covid-ct", "1.0", metrics={"test_accuracy": 0.91})
    assert main(["models", "activate", "covid-ct:1.0", "--by", "dr.cli"]) == 0
    assert "activated covid-ct:1.0" in capsys.readouterr().out
    assert main(["models", "list", "--json"]) == 0
    rows = {f"{r['name']}:{r['version']}": r for r in json.loads(capsys.readouterr().out)}
    assert rows["covid-ct:1.0"]["active"] and rows["covid-ct:1.0"]["test_accuracy"] == 0.91
    assert rows[DEMO_REF]["builtin"] and rows[DEMO_REF]["demo"] and not rows[DEMO_REF]["active"]
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("* covid-ct:1.0") and "0.910" in line for line in lines)
    assert any(line.startswith(f"  {DEMO_REF}") and "built in, DEMO" in line for line in lines)
    assert main(["models", "activate", "nope:1"]) == 2
    assert "no model nope:1" in capsys.readouterr().err
    assert main(["models", "activate", "../x:1"]) == 2
    assert "model name must be" in capsys.readouterr().err


def test_models_list_on_a_fresh_install_shows_the_demo(settings, monkeypatch, capsys):
    use_cli(monkeypatch, settings)
    assert main(["models", "list"]) == 0
    assert f"* {DEMO_REF}" in capsys.readouterr().out
    assert not (settings.data_dir / "ainode.db").exists()  # listing creates no database
    assert main(["models", "activate", DEMO_REF]) == 2
    assert "run `ainode db upgrade`" in capsys.readouterr().err


def test_classify_uses_the_activated_bundle(settings, monkeypatch, capsys, tmp_path):
    built = build_node(settings, migrate=True)
    add_bundle(settings, "covid-ct", "3.1")
    activate(built, "covid-ct:3.1")
    built.close()
    use_cli(monkeypatch, settings)
    spec = phantom.PhantomSpec(finding="covid", slices=30, seed=36)
    png = tmp_path / "slice.png"
    hu = phantom.generate_hu_volume(spec)
    png.write_bytes(imaging.to_png_bytes(imaging.apply_window(hu[20], imaging.LUNG)))
    assert main(["classify", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "covid-ct 3.1"
    assert main(["classify", str(png)]) == 0
    assert "model: covid-ct 3.1" in capsys.readouterr().out


@pytest.mark.parametrize(("runtime", "exported"), [("onnx", True), ("keras", False)])
def test_activation_prepares_the_runtime_the_workers_will_use(
    make_settings, runtime, exported, caplog
):
    """Under ONNX Runtime the export is made at activation (minutes for a large model),
    so the first study analysed after it does not wait for it."""
    import logging

    built = build_node(make_settings(model_runtime=runtime), migrate=True)
    try:
        folder = add_bundle(built.settings, "covid-ct", "3.0")
        (folder / "model.onnx").unlink(missing_ok=True)
        caplog.set_level(logging.INFO, logger="node.analysis.keras_model")
        activate(built, "covid-ct:3.0")
    finally:
        built.close()
    assert (folder / "model.onnx").is_file() is exported
    assert any("exporting to ONNX" in r.getMessage() for r in caplog.records) is exported
