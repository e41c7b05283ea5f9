"""How many CPU threads one worker's model may use, so that workers on a host share the cores.

ONNX Runtime gives each session a pool of intra-op threads that spin while they wait. Two
worker processes that each take every core run slower together than one would alone, so
``model_threads = 0`` (the default) gives each analysis worker process on the host an equal
share of the CPUs this process may run on (``os.sched_getaffinity``: a container's or
``taskset``'s limit counts). Only workers consuming the ``analysis`` queue are counted: the
``uploads`` worker that ``ainode serve`` also starts classifies one uploaded image now and
then, and halving the analysis worker's cores for it would slow every study; it takes the
same share. ``ainode serve`` on 2 cores therefore gives its analysis worker both; two
``ainode worker --queues analysis`` on one host get one each. Workers in separate containers
cannot see each other: give them ``model_threads`` explicitly.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# the queue whose tasks keep the model busy (node.workflow.tasks.MODEL_QUEUES also load it)
SHARING_QUEUES = frozenset({"analysis"})


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's entries of a ``/proc/cpuinfo`` text (``model name``, ``flags``...)."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if not colon:
            if entries:  # the blank line after the first processor
                break
            continue
        entries.setdefault(name.strip(), value.strip())
    return entries


@functools.cache
def cpuinfo() -> dict[str, str]:
    """This host's :func:`parse_cpuinfo`, read once; empty where it cannot be read (not Linux)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    except OSError:
        return {}


def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def serves_model(argv: list[str]) -> bool:
    """Whether a command line is an ``ainode worker`` consuming the analysis queue (no
    ``--queues``: every queue), the workers that share the host's cores."""
    words = [Path(word).name for word in argv[:3]]
    if "worker" not in argv or not any(w in ("ainode", "ainode.cli") for w in words):
        return False
    for index, word in enumerate(argv):
        value = None
        if word.startswith("--queues="):
            value = word.split("=", 1)[1]
        elif word == "--queues" and index + 1 < len(argv):
            value = argv[index + 1]
        if value is not None:
            return bool(SHARING_QUEUES & {q.strip() for q in value.split(",")})
    return True


def model_workers_on_host(proc: Path = Path("/proc")) -> int:
    """How many ``ainode worker`` processes consuming the analysis queue run on this host
    (this process's PID namespace), at least 1."""
    count = 0
    try:
        entries = [entry for entry in proc.iterdir() if entry.name.isdigit()]
    except OSError:  # no /proc: count this process alone
        return 1
    for entry in entries:
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
        count += serves_model(argv)
    return max(1, count)


def intra_op_threads(model_threads: int = 0) -> int:
    """The intra-op threads of this process's model: ``model_threads`` when set, else the
    available CPUs divided among the host's analysis workers (at least 1)."""
    if isinstance(model_threads, bool) or not isinstance(model_threads, int) or model_threads < 0:
        raise ValueError(f"model_threads must be an integer >= 0, got {model_threads!r}")
    if model_threads:
        return model_threads
    return max(1, available_cpus() // model_workers_on_host())
