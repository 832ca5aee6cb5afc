"""
Answers worked out from a host's facts, kept until an operation changes the host.

pyinfra 3 runs a fact's command again each time it is asked for. Some answers cost several facts,
and several operations ask the same question: the driver's plan (``nvidia_driver.host_plan``) reads
what apt offers and what dpkg holds, loading the package lists each time, once when the deploy is
prepared and again in each driver operation. A function decorated with ``until_changed`` answers
from its last call on the same host with the same arguments while nothing can have changed there
since: no operation on the host has run a command or failed in between (an apt source added, a
package installed, a reboot: each is an operation that ran commands). A no-op run asks apt once.
``fact`` does the same for one fact: ask it outside operations, or in an operation before it yields
a command (the operation's own commands count once it has finished).
"""

import copy
import functools

from pyinfra import host


def changed_or_failed(meta):
    """Whether an operation (its ``OperationMeta``) has finished, having run commands or failed."""
    return meta.is_complete() and (meta.did_change() or meta.did_error())


def changes_so_far(state, current):
    """How many of ``current``'s operations so far ran commands or failed."""
    return sum(1 for data in state.ops.get(current, {}).values() if changed_or_failed(data.operation_meta))


def until_changed(function):
    """Decorate ``function(*args)`` (hashable arguments, answered for pyinfra's current host): its
    answer is kept while ``changes_so_far`` on that host stays the same. An exception is not kept."""
    answers = {}

    @functools.wraps(function)
    def answer(*args):
        current = host._get_module()
        key = (id(current.state), current.name, args)
        changes = changes_so_far(current.state, current)
        kept = answers.get(key)
        if kept is not None and kept[0] == changes:
            return kept[1]
        value = function(*args)
        answers[key] = (changes, value)
        return value

    answer.forget = answers.clear
    return answer


def per_run(function):
    """Decorate ``function()`` (no arguments), an answer read from the whole inventory and the same on
    every host: worked out once per run (pyinfra's state) instead of once per host, which at fifty
    hosts is fifty walks of fifty hosts' data."""
    answers = {}

    @functools.wraps(function)
    def answer():
        state = host._get_module().state
        kept = answers.get(id(state))
        if kept is None or kept[0] is not state:
            kept = answers[id(state)] = (state, function())
        return kept[1]

    answer.forget = answers.clear
    return answer


@until_changed
def _fact_answer(fact_class, arguments):
    return host.get_fact(fact_class, **dict(arguments))


def fact(fact_class, **arguments):
    """``host.get_fact(fact_class, **arguments)``, answered from its last run on this host while no
    operation there has changed anything since (``until_changed``); a copy, so callers may change it."""
    return copy.deepcopy(_fact_answer(fact_class, tuple(sorted(arguments.items()))))
