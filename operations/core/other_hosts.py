"""
Asking another host of the run while pyinfra prepares or runs every host at once, one greenlet
each. Without care, fifteen hosts asking the same host at the same moment (whether it serves, what
its upgrade changes, what its gateway holds out) open fifteen SSH channels on its one connection,
and OpenSSH refuses a connection's channels past ``MaxSessions`` (10 by default): measured on 16
lab hosts, "open failed: Connect failed", and the asked host failed the run. So at most ``SLOTS``
questions run on one host at a time (``fact_of``), and a question asked once per run (``answer``)
is worked out once: a host asking while another works it out waits for that answer.
"""

import gevent.event
import gevent.lock
from pyinfra.context import ctx_host

# questions at once on one host's connection (its own operations' commands come beside them)
SLOTS = 4
# host name -> the semaphore of its slots
_SLOTS = {}
# (host name, question) -> (pyinfra state, AsyncResult of the answer): once per run (state)
_ANSWERS = {}


def _slots(other):
    return _SLOTS.setdefault(other.name, gevent.lock.BoundedSemaphore(SLOTS))


def fact_of(other, fact_class, **arguments):
    """``other.get_fact(fact_class, **arguments)``, in one of ``other``'s slots."""
    with _slots(other), ctx_host.use(other):
        return other.get_fact(fact_class, **arguments)


def answer(other, question, work):
    """``work()``, run with ``other`` as pyinfra's current host and in one of its slots, once per run
    for ``question`` (hashable): every later or concurrent asker gets that answer (or its exception)."""
    key = (other.name, question)
    kept = _ANSWERS.get(key)
    if kept is not None and kept[0] is other.state:
        return kept[1].get()
    pending = gevent.event.AsyncResult()
    _ANSWERS[key] = (other.state, pending)
    try:
        with _slots(other), ctx_host.use(other):
            pending.set(work())
    except Exception as error:  # the askers waiting get it too
        pending.set_exception(error)
    return pending.get()
