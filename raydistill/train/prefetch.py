"""Background prefetch of the next micro-batches (no dependency beyond the standard library: the
Ray-free training loop and the GPU smoke check import it)."""

from __future__ import annotations


def prefetched(batches, fn, depth: int = 2, skip: int = 0):
    """Yield ``fn(batch)`` for each batch of the iterable ``batches``, computed ``depth`` batches
    ahead in a background thread, so the next micro-batch is collated (``collate``: numpy and torch
    release the GIL) while the current one trains. The first ``skip`` batches are consumed but not
    passed to ``fn`` (yielded as None: what a resumed run trained already). An exception in the
    thread is raised here; closing the generator stops the thread after its current batch."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for i, raw in enumerate(batches):
                item = None if i < skip else fn(raw)
                while not stop.is_set():
                    try:
                        q.put(("ok", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("ok", done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("error", e))
        finally:  # a generator source (Ray Data's iter_batches) stops its work when closed, in this thread
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="raydistill-collate", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "error":
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
