"""Stopping a run on request: SIGTERM (preemption), Ctrl-C, or a callback, always with a checkpoint.

:class:`StopFlag` turns SIGTERM and the first SIGINT into a request that the training loop
honours after the current iteration: it writes last.pt and the process exits with the shell's
status for the signal (143 for SIGTERM, 130 for SIGINT). The handlers stay installed until that
final checkpoint is written: a second signal during the save is noted, not fatal. A second
Ctrl-C *before* the save starts aborts at once (KeyboardInterrupt), as usual.

``timeout``, Slurm and container runtimes stop a job by signalling its whole process group,
DataLoader workers included. A worker that dies first makes the main process fail ("DataLoader
worker ... exited unexpectedly") before it can save, so the workers of a
:class:`StopSafeDataLoader` ignore SIGTERM and SIGINT: they run until the main process shuts them
down. The signals are blocked while the workers are forked, so none can arrive between a
worker's start and its ``worker_init_fn``. A worker also dies with its parent: on Linux the kernel
sends it SIGKILL when the main process ends, however it ends (``prctl(PR_SET_PDEATHSIG)``; a
``kill -9`` of the main process leaves no orphaned workers holding memory), and elsewhere torch's
own check ends it within seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Set by SIGTERM/SIGINT or :meth:`request`; the loop checkpoints and exits after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_received: int | None = None  # the first signal, which sets the exit status
        self._saving = False
        self._installed = False

    def request(self) -> None:
        """Ask the run to stop after the current step (as SIGTERM does, without a signal)."""
        self.requested = True

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            self.requested, self.signal_received = True, signum
            if signum == signal.SIGINT:
                print("\nCtrl-C: stopping after this iteration with a checkpoint (Ctrl-C again to abort)",
                      file=sys.stderr)
            return
        if self._saving:
            print(f"\n{name} again: the checkpoint is being written; exiting as soon as it is complete",
                  file=sys.stderr)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C before the save: abort now

    @contextlib.contextmanager
    def handle_signals(self, *, ignore_after_stop: bool = False) -> Iterator[None]:
        """Turn SIGTERM and SIGINT into stop requests while the block runs (main thread only).

        Nested use is a no-op. ``ignore_after_stop``: when the block ends after a stop, leave
        both signals ignored instead of restoring the previous handlers, so that a late signal
        cannot change the status of a process that is about to exit (the command line's case).
        """
        if self._installed or threading.current_thread() is not threading.main_thread():
            yield
            return
        # getsignal gives None for a handler installed outside Python: restore the default then
        previous = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        self._installed = True
        try:
            yield
        finally:
            self._installed = False
            for sig, old_handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if ignore_after_stop and self.requested else old_handler)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """While the block runs (the final checkpoint), further signals are noted, not acted on."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False


# ------------------------------------------------------------------------------ DataLoader workers


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: this worker ignores SIGTERM/SIGINT (its parent stops it)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked while it was forked


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent ``parent_pid`` ends (Linux; elsewhere
    nothing). If the parent is already gone, exit now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the prctl: nobody would signal us
        os._exit(0)


class _ChainedInit:
    """``ignore_stop_signals`` and :func:`die_with_parent`, then the caller's worker_init_fn (a
    class: picklable for spawn)."""

    def __init__(self, then: Callable[[int], None] | None) -> None:
        self.then, self.parent_pid = then, os.getpid()

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals(worker_id)
        die_with_parent(self.parent_pid)
        if self.then is not None:
            self.then(worker_id)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back (delivered when the block ends) while workers are forked."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopSafeDataLoader(DataLoader):
    """A DataLoader whose worker processes ignore SIGTERM and SIGINT and die with the main process
    (see the module docstring)."""

    def __init__(self, *args: Any, worker_init_fn: Callable[[int], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, worker_init_fn=_ChainedInit(worker_init_fn), **kwargs)

    def __iter__(self) -> Any:
        if self.num_workers == 0:
            return super().__iter__()
        with _stop_signals_blocked():
            return super().__iter__()  # forks the workers, with the signals blocked
