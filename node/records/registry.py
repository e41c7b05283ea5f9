"""The model registry: bundles under ``models_dir/NAME/VERSION/``, which one is active, and the
active bundle as a worker serves it (reloaded only when the activation or its model.json changes).

The active model is, in order: ``Settings.model_dir`` when set (it pins the model and
activations are ignored), the newest :class:`~node.db.ModelActivation` row, the built-in demo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.analysis.bundle import ModelBundle
from node.analysis.bundle_format import INFO_FILE, MODEL_FILE
from node.analysis.model_info import BundleError, ModelInfo
from node.records.db import ModelActivation
from node.settings import DEMO_MODEL_DIR, Settings

log = logging.getLogger(__name__)

BUILTIN_DIR = DEMO_MODEL_DIR
# One path component each: no "/", no "..", no leading dot (write_bundle's temp folders start
# with one), lengths as in the model_activation table.
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MAX_LENGTH = {"name": 128, "version": 64}


@dataclass(frozen=True)
class RegisteredModel:
    """One bundle the node knows: its ``model.json``, or why it cannot be served."""

    name: str
    version: str
    folder: Path
    info: ModelInfo | None
    error: str | None = None
    builtin: bool = False
    active: bool = False
    pinned: bool = False  # served because Settings.model_dir names it
    loaded: ModelBundle | None = field(default=None, compare=False, repr=False)  # activate's

    @property
    def ref(self) -> str:
        """``NAME:VERSION``, as ``ainode models activate`` takes it."""
        return f"{self.name}:{self.version}"


def bundle_folder(settings: Settings, name: str, version: str) -> Path:
    """The registry folder of ``NAME/VERSION``; raises ValueError naming an unsafe part."""
    for what, value in (("name", name), ("version", version)):
        limit = _MAX_LENGTH[what]
        if not isinstance(value, str) or not _COMPONENT.fullmatch(value) or len(value) > limit:
            raise ValueError(
                f"model {what} must be 1-{limit} letters, digits, '.', '_' or '-' starting "
                f"with a letter or digit, got {value!r}"
            )
    return settings.resolved_models_dir / name / version


def parse_ref(ref: str) -> tuple[str, str]:
    """``(name, version)`` of ``NAME:VERSION``; raises ValueError when it is not one."""
    name, colon, version = ref.partition(":")
    if not colon:
        raise ValueError(f"give the model as NAME:VERSION, got {ref!r}")
    return name, version


def check_bundle(folder: Path, name: str, version: str) -> ModelInfo:
    """``model.json`` validated (preprocessing included) and naming this name and version."""
    info = ModelInfo.from_json(folder / INFO_FILE)
    if (info.name, info.version) != (name, version):
        raise BundleError(
            f"{folder / INFO_FILE}: names {info.name}:{info.version} but the bundle is "
            f"registered as {name}:{version}"
        )
    if not (folder / MODEL_FILE).is_file():
        raise BundleError(f"{folder / MODEL_FILE}: missing (the bundle has no model)")
    return info


def _read(folder: Path, name: str, version: str, **flags: bool) -> RegisteredModel:
    try:
        info, error = check_bundle(folder, name, version), None
    except BundleError as exc:
        info, error = None, str(exc)
    return RegisteredModel(name, version, folder, info, error, **flags)


def _builtin() -> RegisteredModel:
    info = ModelInfo.from_json(BUILTIN_DIR / INFO_FILE)  # shipped with the node: must be valid
    return RegisteredModel(info.name, info.version, BUILTIN_DIR, info, builtin=True)


def _registered(settings: Settings) -> list[RegisteredModel]:
    root = settings.resolved_models_dir
    if not root.is_dir():
        return []
    return [
        _read(version, name.name, version.name)
        for name in sorted(root.iterdir())
        if name.is_dir() and not name.name.startswith(".")
        for version in sorted(name.iterdir())
        if version.is_dir() and not version.name.startswith(".")
    ]


def newest_activation(session: Session | None) -> ModelActivation | None:
    """The activation in force (None: nothing was ever activated, or no database yet)."""
    if session is None:
        return None
    return session.scalars(
        select(ModelActivation).order_by(
            ModelActivation.activated_at.desc(), ModelActivation.id.desc()
        )
    ).first()


def list_models(settings: Settings, session: Session | None) -> list[RegisteredModel]:
    """Every bundle in the registry and the built-in demo, broken ones with their error.

    ``session`` None means the node has no database yet, so nothing was ever activated. The
    active model is listed even when it is not in the registry: a pinned ``model_dir``
    elsewhere, or an activated bundle whose folder is gone.
    """
    models = [*_registered(settings), _builtin()]
    active = active_model_dir(settings, session, must_exist=False).resolve()
    if all(m.folder.resolve() != active for m in models):
        models.append(_outside(active))
    pinned = settings.model_dir is not None
    return [
        dataclasses.replace(m, active=True, pinned=pinned) if m.folder.resolve() == active else m
        for m in models
    ]


def _outside(folder: Path) -> RegisteredModel:
    """A bundle outside the registry, named by its model.json or else by its folders."""
    if not folder.is_dir():
        return RegisteredModel(
            folder.parent.name, folder.name, folder, None, f"{folder}: the bundle folder is gone"
        )
    try:
        info = ModelInfo.from_json(folder / INFO_FILE)
    except BundleError as exc:
        return RegisteredModel(folder.parent.name, folder.name, folder, None, str(exc))
    return RegisteredModel(info.name, info.version, folder, info)


def find_model(settings: Settings, name: str, version: str) -> RegisteredModel:
    """The registered (or built-in) bundle ``name:version``; LookupError lists what exists."""
    folder = bundle_folder(settings, name, version)
    if folder.is_dir():
        return _read(folder, name, version)
    builtin = _builtin()
    if (builtin.name, builtin.version) == (name, version):
        return builtin
    known = ", ".join(m.ref for m in [*_registered(settings), builtin])
    raise LookupError(
        f"no model {name}:{version} in {settings.resolved_models_dir} (known: {known})"
    )


def activate(
    settings: Settings, session: Session, ref: str, by: str, progress: bool = False
) -> RegisteredModel:
    """Record ``NAME:VERSION`` as the active model once its bundle is proven to load.

    The caller commits. Raises ValueError for an unsafe name, LookupError for an unknown
    model and :class:`~node.analysis.model_info.BundleError` for a bundle the node cannot
    serve. While ``model_dir`` is set the row is still written but has no effect (``active``
    is False): the caller tells the user. The returned model's ``loaded`` is the bundle as
    loaded (its runtime, gate figures and batch size); ``progress`` shows the conversion and
    the agreement gate as a progress bar on stderr.
    """
    name, version = parse_ref(ref)
    model = find_model(settings, name, version)
    if model.error is not None:
        raise BundleError(f"{model.ref} cannot be activated: {model.error}")
    # Loaded as the workers will serve it: the weights agree with model.json, and under
    # ONNX Runtime (auto on a CPU-only host) the export, the INT8 conversion, the agreement
    # gate and the timings are made and cached now, so the wait (minutes for EfficientNetB7)
    # is the activating admin's, not the next study's.
    loaded = ModelBundle.load(
        model.folder,
        runtime=settings.model_runtime,
        threads=settings.model_threads,
        progress=progress,
    )
    session.add(ModelActivation(name=name, version=version, activated_by=by))
    session.flush()
    return dataclasses.replace(model, active=settings.model_dir is None, loaded=loaded)


def active_model_dir(settings: Settings, session: Session | None, must_exist: bool = True) -> Path:
    """The folder of the model to serve: pinned ``model_dir``, newest activation, built-in demo.

    Raises :class:`~node.analysis.model_info.BundleError` when the activated bundle's folder
    is gone (unless ``must_exist`` is false, as when listing).
    """
    if settings.model_dir is not None:
        return settings.model_dir
    row = newest_activation(session)
    if row is None:
        return BUILTIN_DIR
    folder = bundle_folder(settings, row.name, row.version)
    builtin = _builtin()
    if not folder.is_dir() and (builtin.name, builtin.version) == (row.name, row.version):
        return BUILTIN_DIR
    if must_exist and not folder.is_dir():
        raise BundleError(
            f"the active model {row.name}:{row.version} (activated by {row.activated_by} at "
            f"{row.activated_at:%Y-%m-%d %H:%M}) has no folder {folder} any more: restore it "
            "or run `ainode models activate` with another model"
        )
    return folder


@contextmanager
def registry_session(settings: Settings) -> Iterator[Session | None]:
    """A session on the node's database for a one-off command (None: no database yet).

    An embedded SQLite database that was never created holds no activation, so a fresh
    install can list and use the demo without creating one; any other database must be
    at the shipped schema.
    """
    from node.records import schema
    from node.records.db import make_engine, make_session_factory

    if settings.database_url is None and not (settings.data_dir / "ainode.db").exists():
        yield None
        return
    engine = make_engine(settings.resolved_database_url)
    try:
        schema.require_current(engine)
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


class ActiveBundle:
    """The active model of one worker process, reloaded only when it changes.

    The cache key is the bundle folder and the SHA-256 of its ``model.json``: an activation
    moves the folder, a bundle rewritten in place changes its ``model.json`` (``created_at``).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._key: tuple[Path, str] | None = None
        self._bundle: ModelBundle | None = None

    def current(self, session: Session) -> ModelBundle:
        """The bundle to serve now: one query, and a reload only when the key changed."""
        folder = active_model_dir(self.settings, session)
        try:
            digest = hashlib.sha256((folder / INFO_FILE).read_bytes()).hexdigest()
        except OSError as exc:
            raise BundleError(f"{folder / INFO_FILE}: cannot be read ({exc})") from exc
        key = (folder.resolve(), digest)
        if key != self._key or self._bundle is None:
            self._bundle = ModelBundle.load(
                folder,
                runtime=self.settings.model_runtime,
                mixed_precision=self.settings.mixed_precision,
                threads=self.settings.model_threads,
            )
            self._key = key
            log.info("serving model %s from %s", self._bundle.info.identity().label, folder)
        return self._bundle
