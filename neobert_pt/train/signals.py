"""Stop cleanly on SIGTERM / SIGINT: finish the step, save a checkpoint on every rank, write the summary, exit 75.

Schedulers (SLURM, Kubernetes, most clouds) send SIGTERM some time before they kill a job; Ctrl-C sends SIGINT.
:class:`StopOnSignal` only records the signal (a handler never interrupts a step or a collective). After each step
the trainer asks :meth:`StopOnSignal.requested`, which in a multi-process run all-reduces the flag, so every rank
stops after the SAME step even when only some ranks received the signal, and they save together.

A second signal at least :data:`REPEAT_GRACE_S` after the first exits at once (the default action of that signal;
the last complete checkpoint is untouched). Copies delivered together — ``accelerate launch`` forwarding the
signal the whole process group already received — count as one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_GRACE_S = 2.0


class StopOnSignal:
    """Records SIGTERM / SIGINT while installed; see the module docstring."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # signal.signal only works there
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
            logger.warning("received %s: finishing the current step, then saving a checkpoint and stopping "
                           "(send it again to exit at once)", signal.Signals(signum).name)
            return
        if time.monotonic() - self._first_at < REPEAT_GRACE_S:
            return  # the same signal forwarded by the launcher
        logger.warning("second %s: exiting now without saving (the last complete checkpoint is intact)",
                       signal.Signals(signum).name)
        self.uninstall()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def requested(self, device: torch.device | str = "cpu") -> bool:
        """True on every rank when any rank received a signal (a collective in multi-process runs)."""
        from neobert_pt.train import distributed

        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        return bool(distributed.all_reduce(flag, op="max").item() > 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "signal"
