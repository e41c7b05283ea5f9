"""Real peer processes for integration tests: Orthanc, a private PostgreSQL cluster, DCMTK tools."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

LOOPBACK = "127.0.0.1"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
UNCOMPRESSED_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
)
_BIND_ERRORS = ("address already in use", "could not bind", "cannot bind", "bind(")


class OrthancError(RuntimeError):
    """An Orthanc REST call failed; carries the HTTP status and Orthanc's error text."""

    def __init__(self, message: str, status: int | None = None) -> None:
        """Keep the HTTP status next to the message."""
        super().__init__(message)
        self.status = status


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until a TCP connect to host:port succeeds, else raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{host}:{port} not accepting connections: {exc}") from exc
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a process we started (SIGTERM, then SIGKILL) and reap it."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _nodelay_env() -> dict[str, str]:
    """Return the current environment plus TCP_NODELAY=1 (Debian DCMTK stalls without it)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _tail(path: Path, n: int = 50) -> str:
    """Return the last n lines of a text file, or '' when it is missing."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------------


@dataclass
class OrthancServer:
    """A running Orthanc with the DICOMweb plugin, reachable on 127.0.0.1."""

    http_url: str
    dicom_port: int
    aet: str
    workdir: Path
    process: subprocess.Popen
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        """Ignore proxy settings from the environment: everything here is loopback."""
        self.session.trust_env = False

    @property
    def log_path(self) -> Path:
        """Path of Orthanc's combined stdout/stderr log."""
        return self.workdir / "orthanc.log"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb API (QIDO/WADO/STOW)."""
        return self.http_url + "/dicom-web"

    def _request(self, method: str, path: str, timeout: float = 30, **kwargs: Any) -> Any:
        """Send a REST call; return JSON (or bytes for non-JSON bodies); raise OrthancError."""
        url = self.http_url + ("" if path.startswith("/") else "/") + path
        try:
            resp = self.session.request(method, url, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            raise OrthancError(f"{method} {path} failed: {exc}\n{self.log_tail()}") from exc
        if resp.status_code >= 400:
            raise OrthancError(
                f"{method} {path} -> HTTP {resp.status_code}: {resp.text}\n{self.log_tail()}",
                resp.status_code,
            )
        if not resp.content:
            return None
        if resp.headers.get("Content-Type", "").startswith("application/json"):
            return resp.json()
        return resp.content

    def get(self, path: str) -> Any:
        """GET a REST path such as '/system'; JSON decoded when the answer is JSON."""
        return self._request("GET", path)

    def post(
        self, path: str, body: Any = None, *, raw: bytes | None = None, timeout: float = 120
    ) -> Any:
        """POST JSON (or a str as plain text, or raw bytes) to a REST path."""
        if raw is not None:
            return self._request("POST", path, timeout, data=raw)
        if isinstance(body, str):
            return self._request("POST", path, timeout, data=body.encode())
        return self._request("POST", path, timeout, data=json.dumps(body or {}))

    def put(self, path: str, body: Any = None) -> Any:
        """PUT JSON to a REST path."""
        return self._request("PUT", path, data=json.dumps(body or {}))

    def delete(self, path: str) -> Any:
        """DELETE a REST resource, e.g. '/studies/{id}'."""
        return self._request("DELETE", path)

    def upload(self, path_or_bytes: Path | str | bytes) -> dict:
        """Upload one DICOM file via POST /instances; return Orthanc's answer (ID, Status...)."""
        data = (
            path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        )
        return self._request(
            "POST", "/instances", 120, data=data, headers={"Content-Type": "application/dicom"}
        )

    def upload_dir(self, folder: Path) -> int:
        """Upload every *.dcm under folder (recursively); return how many were sent."""
        files = sorted(p for p in Path(folder).rglob("*.dcm") if p.is_file())
        for path in files:
            self.upload(path)
        return len(files)

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register (or replace) a DICOM modality at runtime."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": int(port)})

    def store_to_modality(self, modality: str, resources: list[str], timeout: float = 300) -> dict:
        """C-STORE Orthanc resources to a modality synchronously; raise OrthancError on failure."""
        body = {"Resources": list(resources), "Synchronous": True}
        answer = self.post(f"/modalities/{modality}/store", body, timeout=timeout)
        if isinstance(answer, dict) and answer.get("FailedInstancesCount"):
            raise OrthancError(f"store to {modality} partly failed: {answer}\n{self.log_tail()}")
        return answer

    def studies(self) -> list[str]:
        """Orthanc ids of all studies."""
        return self.get("/studies")

    def instances(self) -> list[str]:
        """Orthanc ids of all instances."""
        return self.get("/instances")

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc id of the study with this StudyInstanceUID, or None."""
        for hit in self.post("/tools/lookup", study_instance_uid) or []:
            if hit.get("Type") == "Study":
                return hit["ID"]
        return None

    def log_tail(self, n: int = 50) -> str:
        """Last n lines of Orthanc's log."""
        return _tail(self.log_path, n)

    def stop(self, *, kill: bool = False) -> None:
        """Stop Orthanc: SIGTERM (clean, ~3.5 s) or, with kill=True, SIGKILL at once; idempotent."""
        self.session.close()
        if kill and self.process.poll() is None:
            self.process.kill()
        stop_process(self.process, timeout=15)

    def __enter__(self) -> OrthancServer:
        """Use as a context manager that stops Orthanc on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop Orthanc."""
        self.stop()


def orthanc_config(
    workdir: Path,
    *,
    http_port: int,
    dicom_port: int,
    aet: str = "ORTHANC",
    modalities: dict[str, tuple[str, str, int]] | None = None,
    stable_age: int = 2,
    extra_config: dict | None = None,
) -> dict:
    """Build the Orthanc configuration used by start_orthanc (extra_config wins)."""
    config: dict[str, Any] = {
        "Name": f"ainode-test-{aet}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpDescribeErrors": True,
        "HttpTimeout": 60,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomScpTimeout": 30,
        "DicomScuTimeout": 30,
        "DicomAssociationCloseDelay": 0,
        "UnknownSopClassAccepted": True,
        "DicomModalitiesInDatabase": False,
        "DicomModalities": {
            name: [m_aet, host, int(port)]
            for name, (m_aet, host, port) in (modalities or {}).items()
        },
        "StableAge": stable_age,
        "ConcurrentJobs": 2,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "SaveJobs": False,
        "DeidentifyLogs": False,
        "StorageCompression": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
    }
    config.update(extra_config or {})
    return config


def _orthanc_ready(server: OrthancServer, deadline: float) -> None:
    """Wait until /system answers, /plugins lists dicom-web and the DICOM port accepts."""
    last_error = "not started"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {server.process.returncode}")
        try:
            server.session.get(server.http_url + "/system", timeout=1).raise_for_status()
            plugins = server.session.get(server.http_url + "/plugins", timeout=1).json()
            if "dicom-web" in plugins:
                wait_for_port(LOOPBACK, server.dicom_port, max(0.1, deadline - time.monotonic()))
                return
            last_error = f"plugins loaded: {plugins}"
        except (requests.RequestException, ValueError) as exc:
            last_error = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"Orthanc not ready in time ({last_error})")


def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: dict[str, tuple[str, str, int]] | None = None,
    stable_age: int = 2,
    extra_config: dict | None = None,
    timeout: float = 30,
) -> OrthancServer:
    """Start Orthanc (with DICOMweb) on free ports; modalities maps name -> (aet, host, port)."""
    binary = shutil.which("Orthanc")
    if binary is None:
        raise RuntimeError("Orthanc binary not found (apt-get install orthanc orthanc-dicomweb)")
    if not DICOMWEB_PLUGIN.exists():
        raise RuntimeError(f"{DICOMWEB_PLUGIN} missing (apt-get install orthanc-dicomweb)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        http_port, dicom_port = free_port(), free_port()
        while dicom_port == http_port:
            dicom_port = free_port()
        config = orthanc_config(
            workdir,
            http_port=http_port,
            dicom_port=dicom_port,
            aet=aet,
            modalities=modalities,
            stable_age=stable_age,
            extra_config=extra_config,
        )
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log_path = workdir / "orthanc.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [binary, "--no-jobs", str(config_path)],
                cwd=workdir,
                env=_nodelay_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = OrthancServer(
            http_url=f"http://{LOOPBACK}:{http_port}",
            dicom_port=dicom_port,
            aet=aet,
            workdir=workdir,
            process=process,
        )
        try:
            _orthanc_ready(server, time.monotonic() + timeout)
            return server
        except (RuntimeError, TimeoutError) as exc:
            server.stop()
            tail = server.log_tail(80)
            if attempt == 1 and any(marker in tail.lower() for marker in _BIND_ERRORS):
                continue
            raise RuntimeError(f"{exc}\n--- orthanc.log ---\n{tail}") from exc
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """Directory with initdb/pg_ctl of the newest installed PostgreSQL server."""
    candidates = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        version = initdb.parent.parent.name
        key = tuple(int(part) for part in version.split(".") if part.isdigit())
        candidates.append((key, initdb.parent))
    if not candidates:
        found = shutil.which("initdb")
        if found:
            return Path(found).parent
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    return max(candidates)[1]


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """Prefix a command so it runs as user postgres when we are root (initdb refuses root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster listening on 127.0.0.1 (trust auth, user postgres)."""

    host: str
    port: int
    workdir: Path
    bindir: Path = field(repr=False, default=Path("/usr/lib/postgresql"))
    log_copy: Path | None = field(repr=False, default=None)

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        """The server log written by pg_ctl."""
        return self.workdir / "postgres.log"

    def url(self, dbname: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        """SQLAlchemy URL (driver='postgresql' gives a plain libpq URL for psycopg.connect)."""
        return f"{driver}://postgres@{self.host}:{self.port}/{dbname}"

    def _admin(self, statement: Any) -> None:
        """Run one statement in autocommit mode on the postgres database."""
        import psycopg

        with psycopg.connect(self.url(driver="postgresql"), autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, name: str) -> str:
        """(Re)create a database and return its SQLAlchemy URL."""
        from psycopg import sql

        self.drop_database(name)
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database if it exists, disconnecting its sessions."""
        from psycopg import sql

        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def log_tail(self, n: int = 50) -> str:
        """Last n lines of the server log."""
        return _tail(self.log_path, n)

    def stop(self) -> None:
        """Stop the cluster (immediate mode), keep a copy of its log, delete its files."""
        if not self.workdir.exists():
            return
        pid_file = self.datadir / "postmaster.pid"
        if pid_file.exists():
            subprocess.run(
                _as_postgres_user(
                    [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate"]
                    + ["-w", "-t", "30", "stop"]
                ),
                cwd=self.workdir,
                capture_output=True,
                text=True,
                timeout=60,
            )
        if self.log_copy is not None and self.log_path.exists():
            with contextlib.suppress(OSError):
                shutil.copyfile(self.log_path, self.log_copy)
        if self.workdir.name.startswith("ainode-pg-"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        """Use as a context manager that stops the cluster on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the cluster."""
        self.stop()


def start_postgres(workdir: Path) -> PostgresServer:
    """initdb + start a private cluster on a free loopback port; never touches a system server."""
    # The cluster lives in a fresh /tmp/ainode-pg-* directory that user postgres can reach
    # (pytest's tmp_path parents are 0700); stop() copies its log to workdir/postgres.log.
    bindir = postgres_bindir()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="ainode-pg-", dir="/tmp" if root else None))
    base.chmod(0o755)
    sockdir = base / "sock"
    sockdir.mkdir()
    if root:
        for path in (base, sockdir):
            shutil.chown(path, "postgres", "postgres")

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        """Run a PostgreSQL tool as user postgres inside the cluster directory."""
        return subprocess.run(
            _as_postgres_user(cmd), cwd=base, capture_output=True, text=True, timeout=120
        )

    server = PostgresServer(LOOPBACK, 0, base, bindir, workdir / "postgres.log")
    init = run(
        [str(bindir / "initdb"), "-D", str(server.datadir), "-A", "trust", "-U", "postgres"]
        + ["--no-sync", "-E", "UTF8", "--no-locale"]
    )
    if init.returncode != 0:
        server.stop()
        raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
    for attempt in (1, 2):
        server.port = free_port()
        options = (
            f"-p {server.port} -k {sockdir} -c listen_addresses={LOOPBACK} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=16MB"
        )
        start = run(
            [str(bindir / "pg_ctl"), "-D", str(server.datadir), "-l", str(server.log_path)]
            + ["-o", options, "-w", "-t", "30", "start"]
        )
        if start.returncode == 0:
            return server
        log = server.log_tail(40)
        if attempt == 1 and any(marker in log.lower() for marker in _BIND_ERRORS):
            continue
        server.stop()
        raise RuntimeError(
            f"pg_ctl start failed ({start.returncode}):\n{start.stdout}\n{start.stderr}\n"
            f"--- postgres.log ---\n{log}"
        )
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# DCMTK command-line tools
# --------------------------------------------------------------------------------------------


def _run_dcmtk(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a DCMTK tool with TCP_NODELAY=1; never raise on a non-zero exit."""
    try:
        return subprocess.run(
            cmd,
            env=_nodelay_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:

        def text(value: Any) -> str:
            """Partial output of a timed-out process as str."""
            return value.decode(errors="replace") if isinstance(value, bytes) else value or ""

        return subprocess.CompletedProcess(
            cmd, 124, text(exc.stdout), text(exc.stderr) + f"\ntimed out after {timeout} s"
        )


def _dicom_files(files: Sequence[Path] | Path) -> list[Path]:
    """Expand a folder (recursively, *.dcm) or a list of paths into files."""
    if isinstance(files, (str, Path)):
        path = Path(files)
        return sorted(p for p in path.rglob("*.dcm") if p.is_file()) if path.is_dir() else [path]
    return [Path(p) for p in files]


def _storescu_config(files: list[Path], folder: Path) -> Path | None:
    """Write a storescu -xf profile proposing each file's own syntax; None if all uncompressed."""
    from pydicom.filereader import read_file_meta_info

    pairs: dict[str, set[str]] = {}
    for path in files:
        try:
            meta = read_file_meta_info(path)
            sop_class = str(meta.MediaStorageSOPClassUID)
            syntax = str(meta.TransferSyntaxUID)
        except Exception:  # noqa: BLE001 - unreadable files are storescu's business
            continue
        pairs.setdefault(sop_class, set()).add(syntax)
    if all(syntaxes <= UNCOMPRESSED_SYNTAXES for syntaxes in pairs.values()):
        return None
    syntax_names: dict[str, str] = {}
    contexts: list[str] = []
    for sop_class in sorted(pairs):
        for syntax in sorted(pairs[sop_class] - UNCOMPRESSED_SYNTAXES):
            name = syntax_names.setdefault(syntax, f"TS{len(syntax_names) + 1}")
            contexts.append(f"{sop_class}\\{name}")
        contexts.append(f"{sop_class}\\Uncompressed")
    if len(contexts) > 128:
        return None
    lines = ["[[TransferSyntaxes]]", "[Uncompressed]"]
    lines += [
        "TransferSyntax1 = 1.2.840.10008.1.2.1",
        "TransferSyntax2 = 1.2.840.10008.1.2.2",
        "TransferSyntax3 = 1.2.840.10008.1.2",
    ]
    for syntax, name in syntax_names.items():
        lines += [f"[{name}]", f"TransferSyntax1 = {syntax}"]
    lines += ["[[PresentationContexts]]", "[Files]"]
    lines += [f"PresentationContext{i} = {ctx}" for i, ctx in enumerate(contexts, 1)]
    lines += ["[[Profiles]]", "[Files]", "PresentationContexts = Files"]
    path = folder / "storescu.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


def storescu(
    host: str,
    port: int,
    files: Sequence[Path] | Path,
    *,
    calling_ae: str = "STORESCU",
    called_ae: str = "AINODE",
    extra: Sequence[str] = (),
    timeout: float = 120,
    keep_syntax: bool = True,
) -> subprocess.CompletedProcess:
    """C-STORE files (or every *.dcm under a folder, via +sd +r +sp) with DCMTK storescu.

    DCMTK 3.6.7 storescu only proposes uncompressed syntaxes by default (-R does not add the
    file's syntax either) and cannot decompress, so a JPEG-LS file fails with "unable to convert
    dataset".  A single compressed syntax can be sent unchanged with its propose option
    (-xs JPEG lossless SV1, -xy/-xx JPEG baseline/extended, -xv/-xw J2K, -xt/-xu JPEG-LS,
    -xr RLE, -xd deflate).  With keep_syntax (default) and no -x*/-xf option in extra this
    helper reads every file's meta header and, if any file is compressed, generates an
    association profile and passes `-xf <cfg> Files`: one presentation context per
    (SOP class, file syntax) plus one uncompressed context per SOP class, so every file (mixed
    syntaxes included) is sent exactly as stored.
    """
    paths = _dicom_files(files)
    cmd = ["storescu", "-aet", calling_ae, "-aec", called_ae]
    if isinstance(files, (str, Path)) and Path(files).is_dir():
        cmd += ["+sd", "+r", "+sp", "*.dcm"]
        targets = [str(files)]
    else:
        targets = [str(p) for p in paths]
    has_syntax_option = any(arg == "-xf" or arg.startswith("-x") for arg in extra)
    with tempfile.TemporaryDirectory(prefix="ainode-storescu-") as tmp:
        if keep_syntax and not has_syntax_option:
            config = _storescu_config(paths, Path(tmp))
            if config is not None:
                cmd += ["-xf", str(config), "Files"]
        return _run_dcmtk([*cmd, *extra, host, str(port), *targets], timeout)


def echoscu(
    host: str,
    port: int,
    *,
    calling_ae: str = "ECHOSCU",
    called_ae: str = "AINODE",
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """C-ECHO with DCMTK echoscu."""
    cmd = ["echoscu", "-aet", calling_ae, "-aec", called_ae, *extra, host, str(port)]
    return _run_dcmtk(cmd, timeout)


def getscu(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    study_instance_uid: str,
    out_dir: Path,
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Study-level C-GET (study root) with DCMTK getscu, writing received files to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["getscu", "-S", "-aet", calling_ae, "-aec", called_ae]
    cmd += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_instance_uid}"]
    cmd += ["-od", str(out_dir), *extra, host, str(port)]
    return _run_dcmtk(cmd, timeout)


def storescp(
    port: int,
    out_dir: Path,
    *,
    aet: str = "STORESCP",
    extra: Sequence[str] = (),
    timeout: float = 10,
) -> subprocess.Popen:
    """Start DCMTK storescp writing <out_dir>/<Modality>.<SOPInstanceUID>.dcm; wait for its port."""
    # Accepts all supported syntaxes (+xa) unless extra has a +x*/-xf option, so compressed
    # files arrive unchanged.  DCMTK 3.6.7 storescp has no bind-address option (it listens on
    # all interfaces).  Output goes to <out_dir>/../storescp-<port>.log (proc.log_path); stop it
    # with stop_process(proc).
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir.parent / f"storescp-{port}.log"
    cmd = ["storescp", "-aet", aet, "-od", str(out_dir), "-fe", ".dcm"]
    if not any(arg == "-xf" or arg.startswith("+x") for arg in extra):
        cmd.append("+xa")
    cmd += [*extra, str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            env=_nodelay_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return proc
        except OSError:
            if time.monotonic() >= deadline:
                stop_process(proc)
                raise RuntimeError(
                    f"storescp not listening on {port}:\n{_tail(log_path)}"
                ) from None
            time.sleep(0.05)


@dataclass
class RedisServer:
    """A private redis-server on a free loopback port (no persistence)."""

    port: int
    workdir: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The broker URL for Celery."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, on the same port) the server and wait until it answers."""
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                LOOPBACK,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_for_port(LOOPBACK, self.port, timeout)

    def stop(self) -> None:
        """Stop the server (as an outage would: queued messages are gone with it)."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def start_redis(workdir: Path) -> RedisServer:
    """Start a private redis-server (Debian package redis-server) for the tests."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(port=free_port(), workdir=workdir)
    server.start()
    return server


@contextlib.contextmanager
def tmpfs(folder: Path, options: str = "size=1m") -> Iterator[Path]:
    """A small real tmpfs mounted on ``folder`` (root only), unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_tmpfs(folder: Path) -> None:
    """Fill a 1 MB tmpfs but for 64 kB: room for folders, none for a CT slice."""
    (folder / "ballast").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))


class ArchiveSCP:
    """A pynetdicom storage SCP for SRs, AE ``ARCHIVE``: answers each C-STORE with ``status``
    and keeps what it received (``received``: SOP Instance UIDs; ``datasets``: decoded, in
    the order they arrived); with ``hold`` each C-STORE waits until :meth:`release` (a slow
    PACS)."""

    AE_TITLE = "ARCHIVE"

    def __init__(self, status: int = 0x0000, hold: bool = False) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Comprehensive3DSRStorage

        self.status, self.received, self.datasets = status, [], []
        self.arrived, self.released = threading.Event(), threading.Event()
        if not hold:
            self.released.set()
        self.port = free_port()
        ae = AE(ae_title=self.AE_TITLE)
        ae.add_supported_context(Comprehensive3DSRStorage)
        handlers = [(evt.EVT_C_STORE, self.handle_store)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def handle_store(self, event):
        from pydicom.dataset import Dataset

        self.received.append(str(event.request.AffectedSOPInstanceUID))
        self.arrived.set()
        self.released.wait(60)
        if self.status == 0x0000:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.datasets.append(ds)
        answer = Dataset()
        answer.Status = self.status
        return answer

    def release(self) -> None:
        self.released.set()

    @property
    def peer(self):
        from node.settings import Peer

        return Peer(name="archive", ae_title=self.AE_TITLE, port=self.port)

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
