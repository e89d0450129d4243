"""Iterate in a background thread, a few items ahead of the consumer.

Image decoding, augmentation and collation release the GIL for most of their time, so a thread
prepares the next batches on another core while the model computes on this one — without the
start-up cost of loader processes. The items come in the iterable's order, and an exception
raised while producing one is raised to the consumer when it reaches that item.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


def prefetched(iterable: Iterable[T], depth: int = 2) -> Iterator[T]:
    """The items of ``iterable``, produced by a background thread at most ``depth`` items ahead.

    The iterable must not draw from global random state (its items would then depend on the
    consumer's timing); the episode datasets draw from per-index generators and the trainer's
    DataLoader from its own seeded generator. Closing the iterator early (``break``, an error in
    the consumer) stops the producer after the item it is making.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    iterator = iter(iterable)  # created here: whatever it draws at creation, it draws in the caller's thread
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((None, exc))

    producer = threading.Thread(target=produce, name="prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        producer.join()
