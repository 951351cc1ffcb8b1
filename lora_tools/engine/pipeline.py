"""An ordered three-stage pipeline: read item k+1 while k is computed and k-1 written.

One thread per stage, bounded queues between them and a byte budget shared by all
stages, so memory stays bounded by ``cap`` however far the reader could run ahead. Torch
kernels and file I/O release the GIL, so the stages really overlap. Items leave in the
order they came in; the first error in any stage stops every stage and is re-raised in
the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_DONE = object()
_POLL = 0.1  # seconds between checks of the stop flag while a queue is full or empty


class Budget:
    """Bytes held in flight. A request larger than the cap waits until nothing else is held."""

    def __init__(self, cap: int) -> None:
        self.cap = max(1, cap)
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._stopped = False

    def acquire(self, n: int) -> int:
        n = min(max(0, n), self.cap)
        with self._cond:
            self._cond.wait_for(lambda: self._stopped or self.used == 0
                                or self.used + n <= self.cap)
            self.used += n
            self.peak = max(self.peak, self.used)
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Pipeline(Generic[T]):
    """``write(item, compute(item, read(item)))`` for every item, in order, overlapped.

    ``cost(item)`` is the bytes the item holds from its read until its write is done.
    """

    def __init__(self, read: Callable[[T], Any], compute: Callable[[T, Any], Any],
                 write: Callable[[T, Any], None], cost: Callable[[T], int], cap: int,
                 depth: int = 2, workers: int = 1) -> None:
        self.read, self.compute, self.write, self.cost = read, compute, write, cost
        self.budget = Budget(cap)
        # Compute threads: items are computed in any order by ``workers`` threads and
        # written in their own order (the writer holds early results; the budget, held
        # until an item is written, still bounds them).
        self.workers = max(1, workers)
        self._stop = threading.Event()
        self._q1: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._q2: queue.Queue[Any] = queue.Queue(maxsize=depth)

    def run(self, items: Iterable[T], overlap: bool = True) -> None:
        if not overlap:
            for item in items:
                self.write(item, self.compute(item, self.read(item)))
            return
        threads = [threading.Thread(target=self._reader, args=(items,), daemon=True)]
        threads += [threading.Thread(target=self._computer, daemon=True)
                    for _ in range(self.workers)]
        for t in threads:
            t.start()
        try:
            self._writer()
        finally:
            self._stop.set()
            self.budget.stop()
            for t in threads:
                t.join()

    def _put(self, q: queue.Queue[Any], value: Any) -> bool:
        while not self._stop.is_set():
            try:
                q.put(value, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue[Any]) -> Any:
        while not self._stop.is_set():
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue
        return _DONE

    def _reader(self, items: Iterable[T]) -> None:
        try:
            for seq, item in enumerate(items):
                held = self.budget.acquire(self.cost(item))
                if self._stop.is_set() or not self._put(self._q1,
                                                        (seq, item, self.read(item), held)):
                    return
        except BaseException as exc:  # handed to the caller's thread, re-raised there
            self._put(self._q1, _Failure(exc))
            return
        for _ in range(self.workers):  # one end mark per compute thread
            self._put(self._q1, _DONE)

    def _computer(self) -> None:
        while True:
            got = self._get(self._q1)
            if got is _DONE or isinstance(got, _Failure):
                self._put(self._q2, got)
                return
            seq, item, payload, held = got
            try:
                result = self.compute(item, payload)
            except BaseException as exc:
                self._put(self._q2, _Failure(exc))
                return
            del payload
            if not self._put(self._q2, (seq, item, result, held)):
                return

    def _writer(self) -> None:
        early: dict[int, tuple[Any, Any, int]] = {}  # computed before their turn
        turn, done = 0, 0
        while done < self.workers:
            got = self._get(self._q2)
            if got is _DONE:
                done += 1
                continue
            if isinstance(got, _Failure):
                raise got.exc
            seq, item, result, held = got
            early[seq] = (item, result, held)
            del got, result
            while turn in early:
                item, result, held = early.pop(turn)
                self.write(item, result)
                del result
                self.budget.release(held)
                turn += 1
        if early:  # every compute thread ended, yet an item before these never came
            raise RuntimeError(f"pipeline: item {turn} was never computed")
