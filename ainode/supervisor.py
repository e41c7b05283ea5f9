"""The worker processes of ``ainode serve``: kept running, and never outliving the node.

:class:`Supervisor` starts each worker command, restarts one that dies (after a back-off that
grows while it keeps dying, with a warning naming it) and stops them all when the node stops.
:func:`die_with_parent` is the worker's half: a worker started by ``ainode serve`` ends when
``serve`` ends, however it ends (SIGKILL included).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("ainode.supervisor")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_description(returncode: int) -> str:
    """How a process ended, as a person reads it: ``exit code 2`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class _Child:
    name: str
    command: list[str]
    process: subprocess.Popen | None = None
    deaths: deque = field(default_factory=deque)  # monotonic times of recent unexpected ends
    restart_at: float | None = None


class Supervisor:
    """Runs worker commands in a thread of their own and restarts any that dies.

    A dead worker is restarted after ``first_delay`` seconds, doubling with each death in the
    last ``window`` seconds up to ``max_delay``; past ``burst`` deaths in that window each
    restart comes with a warning that the worker keeps dying. The children are started and
    stopped by the supervisor's own thread, which lives until :meth:`stop` (a child armed with
    ``PR_SET_PDEATHSIG`` is signalled when the thread that started it ends).
    """

    def __init__(
        self,
        commands: dict[str, Sequence[str]],
        *,
        first_delay: float = 1.0,
        max_delay: float = 60.0,
        window: float = 600.0,
        burst: int = 5,
        poll: float = 0.2,
        stop_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = [_Child(name, list(command)) for name, command in commands.items()]
        self.first_delay, self.max_delay = first_delay, max_delay
        self.window, self.burst, self.poll, self.stop_timeout = window, burst, poll, stop_timeout
        self.clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> Supervisor:
        """Start the workers (in the supervisor's thread) and keep them running."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the workers (SIGTERM, then SIGKILL after ``stop_timeout``) and wait for them."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            for child in self.children:
                child.restart_at = self.clock()  # the first start
            while True:
                for child in self.children:
                    try:
                        self.check(child)
                    except Exception:  # the supervisor must outlive any one surprise
                        log.exception("supervising worker %s failed; trying again", child.name)
                if self._stop.wait(self.poll):
                    break
        finally:
            self._terminate_all()

    def check(self, child: _Child) -> None:
        """Notice a dead worker and (re)start it once its back-off has passed."""
        if child.process is not None:
            returncode = child.process.poll()
            if returncode is None:
                return
            pid = child.process.pid
            child.process = None
            delay = self._died(child)
            log.warning(
                "worker %s (pid %d) ended unexpectedly (%s); restarting it in %.0f s",
                child.name,
                pid,
                exit_description(returncode),
                delay,
            )
        if child.restart_at is None or self.clock() < child.restart_at:
            return
        child.restart_at = None
        restart = bool(child.deaths)
        try:
            # A process group of its own: a Ctrl-C at the terminal reaches `serve`, which
            # stops its workers in order, rather than every worker at once.
            child.process = subprocess.Popen(
                child.command, stdin=subprocess.DEVNULL, process_group=0
            )
        except OSError as exc:
            delay = self._died(child)
            log.error("worker %s could not be started (%s); trying again in %.0f s",
                      child.name, exc, delay)  # fmt: skip
            return
        log.info("worker %s %s (pid %d)", child.name, "restarted" if restart else "started",
                 child.process.pid)  # fmt: skip

    def _died(self, child: _Child) -> float:
        now = self.clock()
        child.deaths.append(now)
        while child.deaths and child.deaths[0] < now - self.window:
            child.deaths.popleft()
        recent = len(child.deaths)
        delay = min(self.max_delay, self.first_delay * 2 ** (recent - 1))
        child.restart_at = now + delay
        if recent > self.burst:
            log.error(
                "worker %s keeps dying: %d times in the last %.0f minutes; it is restarted "
                "every %.0f s meanwhile, and its queues wait: see its messages above",
                child.name,
                recent,
                self.window / 60,
                delay,
            )
        return delay

    def _terminate_all(self) -> None:
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = self.clock() + self.stop_timeout
        for process in running:
            try:
                process.wait(max(0.0, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
        for child in self.children:
            child.process = None


def die_with_parent(parent_pid: int) -> None:
    """End this process (SIGTERM: a worker's warm shutdown) when ``parent_pid`` ends.

    Linux's ``PR_SET_PDEATHSIG`` signals the child even when the parent is killed with
    SIGKILL; elsewhere a thread polls the parent pid. Raises RuntimeError when the parent is
    already gone (it ended before the signal was armed).
    """
    if not _set_parent_death_signal(signal.SIGTERM):
        threading.Thread(
            target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True
        ).start()
    if os.getppid() != parent_pid:
        raise RuntimeError(f"the process that started this worker (pid {parent_pid}) has ended")


def _set_parent_death_signal(sig: signal.Signals) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, every: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(every)
    log.warning("the process that started this worker (pid %d) has ended; stopping", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
