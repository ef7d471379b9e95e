"""SIGTERM (spot-VM preemption, `scancel`, `kill`) -> save a checkpoint and stop cleanly.

One process: a Python signal handler sets a flag the loop reads after every step. Several
processes: they must agree on the step to save at (a save is collective), so the loop asks JAX's
preemption sync service (`multihost_utils.reached_preemption_sync_point`), which hears the
signal on any host and picks a step every host reaches.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

__all__ = ["PreemptionGuard"]

log = logging.getLogger("dinojax.train")


class PreemptionGuard:
    def __init__(self) -> None:
        self._flag = threading.Event()
        self._previous = None
        self._multi = jax.process_count() > 1
        self.signal_name: str | None = None

    def __enter__(self) -> PreemptionGuard:
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "received %s: will checkpoint after the current step and stop", self.signal_name
        )
        self._flag.set()

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` completed steps (collective when multi-process:
        every process must call it at every step)."""
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                hit = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no preemption service (initialize() without it)
                return False
            if hit:
                self.signal_name = self.signal_name or "SIGTERM"
            return hit
        return self._flag.is_set()
