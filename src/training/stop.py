"""Stopping a run cleanly on Ctrl-C or SIGTERM, at a step boundary that can be resumed exactly."""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop at the next step boundary, where it checkpoints
    exactly the state after the last finished step (an optimizer step cut in half could not be
    resumed faithfully). A second Ctrl-C stops at once; the last periodic checkpoint remains."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to stop now) ...", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers only install there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
