"""A background loop on one named daemon thread, with the events it waits on."""

from __future__ import annotations

import threading
from collections.abc import Callable


class LoopThread:
    """Runs `loop` on a daemon thread named `name`. The loop waits on `stopping` (set by
    stop) and, where it has work to be woken for, on `wake`; stop sets both and joins."""

    def __init__(self, name: str, loop: Callable[[], None]) -> None:
        self.name = name
        self._loop = loop
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        """Started and not stopped since."""
        return self._thread is not None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Starts the thread once; later calls do nothing while it has not been stopped."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float) -> None:
        """Signals the loop and waits up to `timeout` seconds for it to return."""
        self.stopping.set()
        self.wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=timeout)
