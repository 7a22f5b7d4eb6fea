"""fairseq 0.12's training iterator (``BufferedIterator``) makes batches in a daemon thread (``BackgroundConsumer``)
that reads ahead until its queue is full. When fairseq-train stops with batches of the epoch still to make
(``--max-update`` reached mid-epoch, a short ``--max-epoch`` run), the interpreter can shut down while that thread
is inside torch (TokenBlockDataset's ``torch.cat``, a collater): Python then ends the thread by unwinding it through
torch's C++ frames, and the process aborts ("terminate called without an active exception", exit status 134) after
a complete run, its checkpoints saved. Scripts that check the exit status see a failure.

The plugin parks those threads before the interpreter shuts down: an ``atexit`` handler gives each live consumer a
stand-in queue whose ``put`` blocks for good, empties its real queue (so a ``put`` already waiting there returns),
and waits until the thread has reached the stand-in, outside torch. A thread that does not get there within
``WAIT_S`` is left as fairseq leaves it.
"""
import atexit
import threading
import time

WAIT_S = 10.0


class _Parking:
    """A consumer's queue from interpreter exit on: the thread's next ``put`` waits there until the process ends."""

    def __init__(self):
        self.parked = threading.Event()

    def put(self, item, block=True, timeout=None):
        self.parked.set()
        threading.Event().wait()


def park_background_consumers(wait_s=WAIT_S):
    """Park every live fairseq BackgroundConsumer thread (see the module's docstring); returns how many parked."""
    from fairseq.data.iterators import BackgroundConsumer

    consumers = [t for t in threading.enumerate() if isinstance(t, BackgroundConsumer) and t.is_alive()]
    waiting = []
    for consumer in consumers:
        real, parking = consumer._queue, _Parking()
        consumer._queue = parking
        while True:  # a put blocked on the full queue returns, and the thread's next put is the stand-in's
            try:
                real.get_nowait()
            except Exception:  # queue.Empty, or a queue of another kind: nothing more to free
                break
        waiting.append((consumer, parking))
    deadline = time.monotonic() + wait_s
    parked = 0
    for consumer, parking in waiting:
        while consumer.is_alive() and not parking.parked.wait(0.05) and time.monotonic() < deadline:
            pass
        parked += parking.parked.is_set()
    return parked


def install():
    atexit.register(park_background_consumers)
