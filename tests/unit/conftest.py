"""Run an operation's generator against given facts, as pyinfra's own operation tests do."""

from types import SimpleNamespace

import pytest
from pyinfra.api import Config
from pyinfra.api.command import FileUploadCommand, StringCommand
from pyinfra.context import ctx_host, ctx_state

from operations.core import host_memo


class FakeHost:
    """Answers get_fact from a table keyed by fact class name (and its arguments)."""

    def __init__(self, facts, data=None, name="fake-host"):
        self.facts = facts
        self.data = SimpleNamespace(**(data or {}))
        self.name = name
        self.noops = []
        self.current_op_global_arguments = {}
        self.state = SimpleNamespace(ops={})  # no operation has run: host_memo asks each fact once

    def get_fact(self, fact_cls, *args, **kwargs):
        name = fact_cls.__name__
        keyed = f"{name}:{','.join(str(v) for v in list(args) + list(kwargs.values()))}"
        if keyed in self.facts:
            return self.facts[keyed]
        if name in self.facts:
            return self.facts[name]
        default = getattr(fact_cls, "default", None)
        return default() if callable(default) else None

    def get_temp_filename(self, hash_key=None, hash_filename=True, *args, **kwargs):
        return f"/tmp/pyinfra-{hash_key}"

    def noop(self, description):
        self.noops.append(description)

    def log(self, message, *args, **kwargs):
        pass


def describe(command):
    if isinstance(command, FileUploadCommand):
        src = command.src.getvalue() if hasattr(command.src, "getvalue") else command.src
        return ("upload", command.dest, src)
    if isinstance(command, StringCommand):
        return command.get_raw_value()
    return str(command)


@pytest.fixture
def run_op():
    """run_op(op, facts, **kwargs) -> (commands, noops)"""

    def run(op, facts, data=None, **kwargs):
        host = FakeHost(facts, data)
        host_memo._fact_answer.forget()  # a fresh host may reuse a freed one's id
        state = SimpleNamespace(config=Config(), print_noop_info=False)
        with ctx_state.use(state), ctx_host.use(host):
            commands = [describe(c) for c in op._inner(**kwargs)]
        return commands, host.noops

    return run
