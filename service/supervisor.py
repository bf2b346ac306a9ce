"""Several worker processes on one port: start them, pass a drain on, replace one that dies.

`sse-fanout serve --workers N` with N > 1 runs this in the first process, which serves
nothing itself. Each worker is a fork of it with listening sockets of its own on the shared
address (SO_REUSEPORT, see `startup.bind_pool_sockets`), its own event loop, app and hub.
The supervisor

- starts the workers, and reports once that all of them serve;
- on SIGTERM or SIGINT closes its copies of the listening sockets and passes the signal on
  to every worker, which drains as a single worker would; it waits for the drains (for
  `drain_timeout_s` plus STOP_MARGIN_S, then SIGKILL) and exits 0 if every worker ended
  cleanly. A second signal is passed on too: a worker cuts its drain short, as alone.
  Workers run in a process group of their own, so a terminal's Ctrl-C reaches them only
  through the supervisor (under systemd use `KillMode=mixed` for the same reason);
- replaces a worker that ends on its own after a delay that doubles, up to
  MAX_RESTART_DELAY_S, while replacements keep dying young, with one log line each time;
  meanwhile the supervisor keeps that worker's sockets open, so connections the kernel
  assigned to them wait in the backlog for the replacement instead of being reset;
- gives up (stops the others, then StartupError) when a worker cannot start: at once while
  the pool has not served yet, which is a configuration or environment problem just as with
  one worker, later after MAX_START_FAILURES attempts in a row.

Workers also watch a pipe the supervisor holds open and drain when it closes, so they never
outlive a supervisor that was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .settings import StartupError

log = logging.getLogger(__name__)

FIRST_RESTART_DELAY_S = 0.1
MAX_RESTART_DELAY_S = 10.0
# A worker that served this long before it ended is replaced after the first delay again.
STABLE_S = 30.0
# Starts in a row that end before the worker serves, after which the supervisor gives up.
MAX_START_FAILURES = 5
# Time past the drain timeout allowed for a worker's clean-up (Redis, hub, producer).
STOP_MARGIN_S = 10.0
# Longest message a worker sends in one write: writes up to PIPE_BUF arrive whole.
_MAX_MESSAGE_BYTES = 2048
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


class WorkerLink:
    """A worker's side of the supervisor's pipes: say it serves or why it could not start."""

    def __init__(self, report_fd: int, lifeline_fd: int) -> None:
        self._report_fd = report_fd
        self._lifeline_fd = lifeline_fd

    def serving(self) -> None:
        """Tell the supervisor this worker serves; from now on drain when it goes away.

        Called on the worker's running event loop.
        """
        self._send("serving")
        os.set_blocking(self._lifeline_fd, False)
        asyncio.get_running_loop().add_reader(self._lifeline_fd, self._check_lifeline)

    def failed(self, reason: str) -> None:
        """Tell the supervisor why this worker could not start (one line, shown as is)."""
        self._send("failed " + " ".join(reason.split()))

    def _send(self, text: str) -> None:
        data = f"{os.getpid()} {text}".encode()[: _MAX_MESSAGE_BYTES - 1] + b"\n"
        with contextlib.suppress(OSError):
            os.write(self._report_fd, data)

    def _check_lifeline(self) -> None:
        try:
            if os.read(self._lifeline_fd, 64):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        # The supervisor is gone: drain as on SIGTERM.
        asyncio.get_running_loop().remove_reader(self._lifeline_fd)
        os.kill(os.getpid(), signal.SIGTERM)


class WorkerMain(Protocol):
    """Runs worker `index` in the forked child until it is told to stop; its exit status."""

    def __call__(self, index: int, link: WorkerLink) -> int: ...


@dataclass(slots=True)
class _Worker:
    index: int
    pid: int = 0
    started_s: float = 0.0
    serving: bool = False
    failures: int = 0
    delay_s: float = FIRST_RESTART_DELAY_S
    restart_at_s: float | None = None
    reason: str = ""


class Supervisor:
    """Runs `count` workers until a signal, see the module docstring."""

    def __init__(
        self,
        count: int,
        main: WorkerMain,
        *,
        drain_timeout_s: float,
        release_sockets: Callable[[], None],
        on_serving: Callable[[], None],
    ) -> None:
        self._workers = [_Worker(index) for index in range(count)]
        self._main = main
        self._stop_after_s = drain_timeout_s + STOP_MARGIN_S
        self._release_sockets = release_sockets
        self._on_serving = on_serving
        self._by_pid: dict[int, _Worker] = {}
        self._pool_served = False
        self._stop_deadline_s: float | None = None
        self._status = 0
        self._failure: str | None = None
        self._pending = b""
        self._wake_r, self._wake_w = os.pipe()
        self._report_r, self._report_w = os.pipe()
        self._lifeline_r, self._lifeline_w = os.pipe()
        for fd in (self._wake_r, self._wake_w, self._report_r):
            os.set_blocking(fd, False)

    def run(self) -> int:
        """Supervise until every worker has ended; the exit status, or StartupError."""
        previous = {sig: signal.signal(sig, _wake_only) for sig in _HANDLED}
        previous_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            for worker in self._workers:
                self._start(worker)
            while self._by_pid or not self._stopping:
                self._wait(self._timeout_s())
                self._reap()
                self._restart_due()
                self._enforce_stop_deadline()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in self._own_fds():
                os.close(fd)
        if self._failure is not None:
            raise StartupError(self._failure)
        return self._status

    @property
    def _stopping(self) -> bool:
        return self._stop_deadline_s is not None

    # --- children ---

    def _start(self, worker: _Worker) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._run_child(worker.index)
        worker.pid, worker.started_s, worker.serving = pid, time.monotonic(), False
        worker.restart_at_s = None
        self._by_pid[pid] = worker

    def _run_child(self, index: int) -> None:
        """The forked worker: never returns into the supervisor's code."""
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in _HANDLED:
                signal.signal(sig, signal.SIG_DFL)
            os.setpgid(0, 0)
            for fd in (self._wake_r, self._wake_w, self._report_r, self._lifeline_w):
                os.close(fd)
            status = self._main(index, WorkerLink(self._report_w, self._lifeline_r))
        except BaseException:  # the child's last stop: report it, then exit
            traceback.print_exc()
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._by_pid.pop(pid, None)
            if worker is not None:
                self._ended(worker, wait_status)

    def _ended(self, worker: _Worker, wait_status: int) -> None:
        how = _describe(wait_status)
        if self._stopping:
            if os.waitstatus_to_exitcode(wait_status) != 0:
                # A pool that gave up says why in one line; a worker that failed the same
                # way a moment later (every worker meets the same unreachable Redis) adds
                # nothing to it.
                if self._failure is None:
                    log.warning(
                        "worker %d (pid %d) ended its drain with %s",
                        worker.index + 1, worker.pid, how,
                    )  # fmt: skip
                self._status = 1
            return
        now = time.monotonic()
        lived_s = now - worker.started_s
        if not worker.serving:
            worker.failures += 1
            if not self._pool_served:
                self._give_up(
                    worker.reason
                    or f"worker {worker.index + 1} of {len(self._workers)} {how} before it served"
                )
                return
            if worker.failures >= MAX_START_FAILURES:
                self._give_up(
                    f"worker {worker.index + 1} failed to start {worker.failures} "
                    f"times in a row (last: {worker.reason or how})"
                )
                return
        elif lived_s >= STABLE_S:
            worker.delay_s = FIRST_RESTART_DELAY_S
        worker.restart_at_s = now + worker.delay_s
        log.warning(
            "worker %d (pid %d) %s after %.1fs%s; starting a new one in %.1fs",
            worker.index + 1, worker.pid, how, lived_s,
            "" if worker.serving else f" before serving ({worker.reason or 'no reason given'})",
            worker.delay_s,
        )  # fmt: skip
        worker.delay_s = min(worker.delay_s * 2, MAX_RESTART_DELAY_S)
        worker.reason = ""

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            if worker.restart_at_s is not None and worker.restart_at_s <= now:
                self._start(worker)

    # --- messages and signals ---

    def _wait(self, timeout_s: float | None) -> None:
        readable, _, _ = select.select([self._wake_r, self._report_r], [], [], timeout_s)
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                for signum in os.read(self._wake_r, 512):
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        self._stop(signal.Signals(signum))
        if self._report_r in readable:
            with contextlib.suppress(BlockingIOError):
                self._pending += os.read(self._report_r, 65536)
            *lines, self._pending = self._pending.split(b"\n")
            for line in lines:
                self._message(line.decode(errors="replace"))

    def _message(self, line: str) -> None:
        pid_text, _, rest = line.partition(" ")
        kind, _, reason = rest.partition(" ")
        worker = self._by_pid.get(int(pid_text)) if pid_text.isdigit() else None
        if worker is None:
            return
        if kind == "failed":
            worker.reason = reason
        elif kind == "serving":
            worker.serving = True
            if self._pool_served:
                log.info("worker %d (pid %d) serves", worker.index + 1, worker.pid)
            elif all(w.serving for w in self._workers) and not self._stopping:
                self._pool_served = True
                self._on_serving()

    def _timeout_s(self) -> float | None:
        due = [w.restart_at_s for w in self._workers if w.restart_at_s is not None]
        if self._stop_deadline_s is not None:
            due.append(self._stop_deadline_s)
        return max(0.0, min(due) - time.monotonic()) if due else None

    # --- stopping ---

    def _stop(self, signum: signal.Signals, *, told: bool = True) -> None:
        """Stop restarting, let go of the sockets and pass `signum` on to every worker.

        `told`: the signal came from outside (else the supervisor gave up, and says so).
        """
        if not self._stopping:
            self._stop_deadline_s = time.monotonic() + self._stop_after_s
            for worker in self._workers:
                worker.restart_at_s = None
            self._release_sockets()
            if told:
                log.info("%s: draining %d workers", signum.name, len(self._by_pid))
        for pid in self._by_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _give_up(self, reason: str) -> None:
        self._failure = reason
        self._status = 1
        self._stop(signal.SIGTERM, told=False)

    def _enforce_stop_deadline(self) -> None:
        if self._stop_deadline_s is None or time.monotonic() < self._stop_deadline_s:
            return
        for pid, worker in list(self._by_pid.items()):
            log.warning(
                "worker %d (pid %d) still running %.0fs after the signal; killing it",
                worker.index + 1,
                pid,
                self._stop_after_s,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            del self._by_pid[pid]
            self._status = 1

    def _own_fds(self) -> list[int]:
        return [
            self._wake_r,
            self._wake_w,
            self._report_r,
            self._report_w,
            self._lifeline_r,
            self._lifeline_w,
        ]


def _wake_only(signum: int, frame: object) -> None:
    """Signals only wake the supervisor's wait (through the wakeup fd), where they are read."""
    del signum, frame


def _describe(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"was killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(wait_status)}"
