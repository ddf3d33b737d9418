"""Work done ahead of the user: a page hands over the keys it will probably be asked for next (the
checkpoints nearest the one shown) and reads the results from memory when the slider gets there.

One worker thread for the whole dashboard (the machine has few cores and the page itself needs
one), fed one key at a time, so that stopping is quick: when the interpreter exits, the next key
cannot be scheduled and the chain ends after the key being computed (a thread killed inside torch
would abort the process).
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable, Iterable

_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dashboard-background")
_LIVE: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()


def stop_all(timeout: float = 120.0) -> None:
    """Stop every prefetcher and wait for the key being computed, so that nothing writes into a run
    folder's caches afterwards (a test about to copy or change a run folder; a server shutting down)."""
    for prefetcher in list(_LIVE):
        prefetcher.stop()
    _POOL.submit(lambda: None).result(timeout)  # one worker, first in first out: the work before it is done


def submit(fn: Callable, *args) -> Future:
    """`fn(*args)` on the background thread, after the work queued before it: a page that would keep its
    visitor waiting (progress measures over every checkpoint of a run nobody analysed) answers at once
    with a notice and shows the result when it is ready (`display.when_ready`)."""
    return _POOL.submit(fn, *args)


class Prefetcher:
    """Computes `fn(key)` for every key, in order, on the background thread.

    `get(key)` returns the result if it is ready, waits for it if the thread is computing it right
    now, and returns None if the thread has not reached it (the page then computes it and `put`s
    it). An error computing a key (a damaged checkpoint) is raised by `get` for that key only.
    """

    def __init__(self, fn: Callable, keys: Iterable[Hashable]):
        self._fn = fn
        self._keys = list(keys)
        self._futures: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self._next = 0
        _LIVE.add(self)
        self._submit_next()

    def _submit_next(self, _finished: Future | None = None) -> None:
        with self._lock:
            while self._next < len(self._keys) and self._keys[self._next] in self._futures:
                self._next += 1  # already computed by the page
            if self._stopped or self._next >= len(self._keys):
                return
            key = self._keys[self._next]
            try:
                future = _POOL.submit(self._fn, key)
            except RuntimeError:  # the interpreter is shutting down: stop here
                self._stopped = True
                return
            self._futures[key] = future
        future.add_done_callback(self._submit_next)

    def get(self, key):
        with self._lock:
            future = self._futures.get(key)
        if future is None:
            return None
        # Queued behind other work: the page computes it sooner. (Cancelling runs the done callback,
        # which passes over this key and schedules the next, so it is never scheduled again.)
        if future.cancel():
            with self._lock:
                del self._futures[key]
            return None
        return future.result()  # done: at once; running: the rest of the one computation

    def put(self, key, value) -> None:
        future: Future = Future()
        future.set_result(value)
        with self._lock:
            self._futures.setdefault(key, future)

    def stop(self) -> None:
        """Schedule nothing more (the key being computed finishes)."""
        with self._lock:
            self._stopped = True

    @property
    def done(self) -> int:
        with self._lock:
            return sum(f.done() for f in self._futures.values())


def by_distance(steps: list[int], start: int) -> list[int]:
    """Steps ordered by how far (in checkpoints) they are from `start`: the ones a user scrubs to next come first."""
    if start not in steps:
        return list(steps)
    i = steps.index(start)
    return sorted(steps, key=lambda s: (abs(steps.index(s) - i), steps.index(s)))
