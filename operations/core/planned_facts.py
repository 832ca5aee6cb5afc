"""
A fact read while pyinfra prepares the run, answered again from that read while nothing has changed.

pyinfra 3 runs an operation's body twice: when it prepares the run (to show what would change before
its prompt) and again when it executes it, and each fact the body asks for runs its command on the
host both times (pyinfra 2 kept what a fact had answered); with ``-y`` it skips the first pass. On a
converged host, run as users type it, half of the commands are those second reads, each an SSH round
trip, taken host by host in step (measured: docs/benchmark.md, "Facts read once"). ``install`` lets
the answers read while preparing stand, per host, fact and arguments (privilege arguments
included), under two rules:

- while preparing, nothing runs on any host but facts, so a fact asked again is answered from its
  first read;
- while executing, a fact asked by an operation the plan found would change nothing is answered
  from the plan's read, until the first operation on any host has run a command or failed (from
  then on every fact runs again, as pyinfra does). An operation that changes something, a nested
  operation, a fact asked outside any operation, or a run that skips the preparing pass
  (``-y``) always runs the fact's command.

So a converged host is read once; a host that changes is read as pyinfra reads it.
"""

import copy

from pyinfra.api import host as pyinfra_host
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.api.facts import _handle_fact_kwargs
from pyinfra.api.state import BaseStateCallback

from operations.core import host_memo


class PlannedFacts(BaseStateCallback):
    """The facts one run read while preparing, and whether any host has changed since it executes.

    pyinfra tells a callback that an operation ended before it records the commands it ran, so the
    operations that started are kept and looked at when a fact is next asked."""

    def __init__(self):
        self.answers = {}  # (host name, fact key) -> answer read while preparing
        self.started = []  # (host, operation hash) started and not yet seen complete
        self.changed = False  # an operation ran a command or failed on some host

    def operation_host_start(self, state, host, op_hash):
        if op_hash in state.ops.get(host, {}):
            self.started.append((host, op_hash))

    def operation_host_error(self, state, host, op_hash, retry_count=0, max_retries=0):
        self.changed = True

    def _look_at_started(self, state):
        running = []
        for host, op_hash in self.started:
            meta = state.get_op_data_for_host(host, op_hash).operation_meta
            if not meta.is_complete():
                running.append((host, op_hash))
            elif host_memo.changed_or_failed(meta):
                self.changed = True
        self.started = running

    def may_answer(self, state, host):
        """Whether a fact asked now may be answered from the plan's read."""
        if not state.is_executing:
            return True
        self._look_at_started(state)
        if self.changed or not state.should_check_for_changes():
            return False
        op_hash = host.current_op_hash
        if op_hash is None or op_hash != host.executing_op_hash or host.nested_executing_op_hash:
            return False  # outside an operation, or in a nested one (its parent is running commands)
        data = state.ops.get(host, {}).get(op_hash)
        return data is not None and data.operation_meta._maybe_is_change is False


def fact_key(state, host, cls, args, kwargs):
    """What makes two reads of a fact the same read: the fact, its arguments and how it runs."""
    fact_kwargs, global_kwargs = _handle_fact_kwargs(state, host, cls, args, kwargs)
    how = {key: global_kwargs[key] for key in (*CONNECTOR_ARGUMENT_KEYS, "_ignore_errors") if key in global_kwargs}
    arguments = sorted((key, value) for key, value in fact_kwargs.items() if key != "self")
    return repr((cls.__module__, cls.__qualname__, arguments, sorted(how.items())))


def planned_facts(state):
    """The run's ``PlannedFacts``, made and registered with pyinfra's state on first use."""
    planned = getattr(state, "gpufleet_planned_facts", None)
    if planned is None:
        planned = state.gpufleet_planned_facts = PlannedFacts()
        state.add_callback_handler(planned)
    return planned


def install():
    """Route every ``host.get_fact`` of this process through the plan's answers (once)."""
    read = pyinfra_host.get_fact
    if getattr(read, "gpufleet_planned", False):
        return

    def get_fact(state, host, cls, args=None, kwargs=None, **options):
        planned = planned_facts(state)
        if options or not planned.may_answer(state, host):
            return read(state, host, cls, args=args, kwargs=kwargs, **options)
        key = (host.name, fact_key(state, host, cls, args, kwargs))
        if key not in planned.answers:
            answer = read(state, host, cls, args=args, kwargs=kwargs)
            if state.is_executing:
                return answer
            planned.answers[key] = answer
        return copy.deepcopy(planned.answers[key])

    get_fact.gpufleet_planned = True
    pyinfra_host.get_fact = get_fact
