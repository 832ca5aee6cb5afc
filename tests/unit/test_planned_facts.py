"""planned_facts: pyinfra's own API on this machine (@local): a converged host's facts are read once,
where pyinfra 3 reads each again at execution; a host that changes is read as pyinfra reads it."""

import pytest
from pyinfra import host
from pyinfra.api import Config, FactBase, Inventory, State, operation
from pyinfra.api import host as pyinfra_host
from pyinfra.api.connect import connect_all
from pyinfra.api.operation import add_op
from pyinfra.api.operations import run_ops

from operations.core import planned_facts


class Value(FactBase):
    """The first line of ``path``; each read adds a byte to ``log`` (so the test counts reads)."""

    def command(self, path, log):
        return f"printf x >> {log}; cat {path}"

    def process(self, output):
        return output[0]


class Variable(FactBase):
    """``$V`` in the fact's environment; each read adds a byte to ``log``."""

    def command(self, log):
        return f'printf x >> {log}; echo "$V"'

    def process(self, output):
        return output[0]


@operation()
def ensure(path, log, wanted):
    if host.get_fact(Value, path=path, log=log) != wanted:
        yield f"echo {wanted} > {path}"


@operation()
def write_then_record(path, log, wanted, record):
    """Writes ``wanted``, then records what the fact says afterwards (a read after its own command)."""
    yield f"echo {wanted} > {path}"
    yield f"echo seen-{host.get_fact(Value, path=path, log=log)} >> {record}"


@operation()
def record_variable(log, record, value):
    yield f"echo {value}={host.get_fact(Variable, log=log, _env={'V': value})} >> {record}"


@pytest.fixture
def files(tmp_path):
    value, log = tmp_path / "value", tmp_path / "reads"
    value.write_text("a\n")
    log.write_text("")
    return value, log


def run(*ops, planned=True, monkeypatch=None):
    """Prepare and execute ``ops`` ((operation, kwargs) pairs) on @local; the ops' meta."""
    if planned:
        monkeypatch.setattr(pyinfra_host, "get_fact", pyinfra_host.get_fact)  # put back after the test
        planned_facts.install()
    state = State(Inventory((["@local"], {})), Config())
    connect_all(state)
    metas = [add_op(state, op, **kwargs)[state.inventory.get_host("@local")] for op, kwargs in ops]
    run_ops(state)
    return metas


def reads(log):
    return len(log.read_text())


def test_a_converged_host_is_read_once_where_pyinfra_reads_each_operation_twice(files, monkeypatch):
    value, log = files
    same = {"path": str(value), "log": str(log), "wanted": "a"}
    run((ensure, same), (ensure, same), planned=False)
    assert reads(log) == 4  # pyinfra 3 alone: each operation's fact when prepared and again when run
    log.write_text("")
    metas = run((ensure, same), (ensure, same), monkeypatch=monkeypatch)
    assert reads(log) == 1
    assert not any(meta.did_change() for meta in metas)


def test_after_a_change_facts_are_read_again(files, monkeypatch):
    value, log = files
    wanted = {"path": str(value), "log": str(log), "wanted": "b"}
    first, second = run((ensure, wanted), (ensure, wanted), monkeypatch=monkeypatch)
    assert first.did_change() and not second.did_change()  # the second saw the first's write
    assert value.read_text() == "b\n"
    assert reads(log) == 3  # once while preparing both, then each operation at execution


def test_a_read_after_an_operations_own_command_sees_it(files, monkeypatch):
    value, log = files
    record = value.parent / "record"
    run(
        (ensure, {"path": str(value), "log": str(log), "wanted": "a"}),  # a no-op: reads "a" while preparing
        (write_then_record, {"path": str(value), "log": str(log), "wanted": "b", "record": str(record)}),
        monkeypatch=monkeypatch,
    )
    assert record.read_text() == "seen-b\n"


def test_reads_that_run_differently_are_not_the_same_read(files, monkeypatch):
    _, log = files
    record = log.parent / "record"
    run(
        (record_variable, {"log": str(log), "record": str(record), "value": "one"}),
        (record_variable, {"log": str(log), "record": str(record), "value": "two"}),
        monkeypatch=monkeypatch,
    )
    assert record.read_text() == "one=one\ntwo=two\n"
