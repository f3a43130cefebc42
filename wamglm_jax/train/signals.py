"""SIGTERM handling for preemptible machines: the handler only sets a flag; the loop polls it
between steps, saves a checkpoint and exits with status 0 (see loop.Preempted)."""
import signal
import threading

from absl import logging


class PreemptionFlag:
    """Context manager installing a SIGTERM (and optionally SIGINT) handler that sets a flag."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._event = threading.Event()
        self._previous = {}

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self):
        self._event.set()

    def _handler(self, signum, frame):
        logging.warning("received signal %d: will save a checkpoint and exit after this step",
                        signum)
        self._event.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signal() needs it
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False
