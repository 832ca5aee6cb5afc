"""fact_reads: pyinfra's own API on this machine (@local): a converged host's facts are read once, in
one command once its last run is known, where pyinfra 3 reads each again at execution; a host that
changes is read as pyinfra reads it."""

import hashlib
import os

import gevent
import pytest
from pyinfra import host
from pyinfra.api import Config, FactBase, Inventory, State, operation
from pyinfra.api import host as pyinfra_host
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.api.operation import add_op
from pyinfra.api.operations import run_ops
from pyinfra.facts.files import Sha256File

from operations.core import fact_reads


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


@pytest.fixture(autouse=True)
def records(tmp_path, monkeypatch):
    """Each test's own record of what a host was asked (none at first)."""
    monkeypatch.setenv("GPUFLEET_FACT_CACHE", str(tmp_path / "facts"))
    return tmp_path / "facts"


def run(*ops, planned=True, monkeypatch=None, commands=None):
    """Prepare and execute ``ops`` ((operation, kwargs) pairs) on @local, then disconnect; the ops'
    meta. ``commands``: a list that gets every command run on the host (facts' included), each with
    what it was given on stdin after a newline."""
    if planned:
        monkeypatch.setattr(pyinfra_host, "get_fact", pyinfra_host.get_fact)  # put back after the test
        fact_reads.install()
    state = State(Inventory((["@local"], {})), Config())
    connect_all(state)
    local = state.inventory.get_host("@local")
    if commands is not None:
        original = local.run_shell_command

        def counted(command, **arguments):
            commands.append(f"{command}\n{arguments.get('_stdin') or ''}")  # the command, then its stdin
            return original(command, **arguments)

        monkeypatch.setattr(local, "run_shell_command", counted)
    metas = [add_op(state, op, **kwargs)[local] for op, kwargs in ops]
    run_ops(state)
    disconnect_all(state)
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
    assert reads(log) == 2  # once while preparing both, then again after the first one's command


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


@operation()
def ensure_both(first, second, log):
    """A no-op on files that hold ``a``: asks the Value of two paths."""
    for path in (first, second):
        if host.get_fact(Value, path=path, log=log) != "a":
            yield f"echo a > {path}"


def two_files(files):
    value, log = files
    other = value.parent / "other"
    other.write_text("a\n")
    return {"first": str(value), "second": str(other), "log": str(log)}


def test_a_second_run_reads_what_the_first_asked_in_one_command(files, monkeypatch, records):
    both = two_files(files)
    first_commands, second_commands = [], []
    run((ensure_both, both), monkeypatch=monkeypatch, commands=first_commands)
    assert len(first_commands) == 2 and len(list(records.iterdir())) == 1  # one read per fact; learned
    metas = run((ensure_both, both), (ensure_both, both), monkeypatch=monkeypatch, commands=second_commands)
    assert len(second_commands) == 1  # both facts, both operations, prepared and executed: one command
    command, script = second_commands[0].split("\n", 1)
    assert command == "sh -s" and "##gpufleet-fact" in script  # the script on stdin: sudo logs arguments
    assert not any(meta.did_change() for meta in metas)
    assert reads(files[1]) == 4  # each fact's own command ran inside it: 2 reads then, 2 now


def test_what_the_one_command_read_stands_only_until_something_runs(files, monkeypatch):
    value, log = files
    both = two_files(files)
    run((ensure_both, both), monkeypatch=monkeypatch)
    value.write_text("b\n")  # changed behind the run's back, before it starts: the one command reads it
    commands = []
    metas = run((ensure_both, both), (ensure_both, both), monkeypatch=monkeypatch, commands=commands)
    assert metas[0].did_change() and not metas[1].did_change()  # the second read again after the first ran
    assert value.read_text() == "a\n"
    # the one read; the first's command, then its read of the second path; the second's two reads
    assert len(commands) == 1 + 1 + 1 + 2


def test_a_learned_command_that_differs_from_today_is_not_trusted(files, monkeypatch, records):
    both = two_files(files)
    run((ensure_both, both), monkeypatch=monkeypatch)
    (record,) = records.iterdir()
    record.write_text(record.read_text().replace("cat ", "echo wrong; cat "))  # learned from older code
    commands = []
    metas = run((ensure_both, both), monkeypatch=monkeypatch, commands=commands)
    assert not metas[0].did_change()  # "wrong" never answered: each fact read on its own
    assert len(commands) == 1 + 2


class StateValue(Value):
    """The Value of a file under ``state/``, an answer that follows from that folder's files alone."""

    state_files = ()  # set per test: the folder


@operation()
def ensure_state(path, log):
    if host.get_fact(StateValue, path=path, log=log) != "a":
        yield f"echo a > {path}"


def test_a_fact_whose_files_are_unchanged_is_answered_from_its_last_answer(files, monkeypatch, tmp_path):
    _, log = files
    state = tmp_path / "state"
    state.mkdir()
    (state / "value").write_text("a\n")
    monkeypatch.setattr(StateValue, "state_files", (str(state),))
    ask = {"path": str(state / "value"), "log": str(log)}
    for _ in range(3):  # learned; read in the one command with its files' fingerprint; not run
        (meta,) = run((ensure_state, ask), monkeypatch=monkeypatch)
        assert not meta.did_change()
    assert reads(log) == 2
    (state / "value").write_text("b\n")  # changed: read again, and the change seen
    (meta,) = run((ensure_state, ask), monkeypatch=monkeypatch)
    assert meta.did_change() and (state / "value").read_text() == "a\n"
    assert reads(log) == 2 + 1  # the one command ran it (its fingerprint differed)
    (meta,) = run((ensure_state, ask), monkeypatch=monkeypatch)
    assert not meta.did_change() and reads(log) == 2 + 1 + 1  # the fix changed the folder too: read again
    (meta,) = run((ensure_state, ask), monkeypatch=monkeypatch)
    assert not meta.did_change() and reads(log) == 2 + 1 + 1  # unchanged since: not run


@operation()
def ensure_tolerant(path, log):
    """Writes ``a`` where the Value is not ``a``, a read that fails included (taken as no value)."""
    if host.get_fact(Value, path=path, log=log, _ignore_errors=True) != "a":
        yield f"echo a > {path}"


def test_a_fact_that_fails_in_the_one_command_is_read_on_its_own(files, monkeypatch):
    value, log = files
    tolerant = {"path": str(value), "log": str(log)}
    run((ensure_tolerant, tolerant), monkeypatch=monkeypatch)
    value.unlink()  # cat fails: exit status 1 inside the script
    commands = []
    metas = run((ensure_tolerant, tolerant), monkeypatch=monkeypatch, commands=commands)
    assert metas[0].did_change() and value.read_text() == "a\n"
    assert len(commands) == 1 + 1 + 1  # the one read, the failed fact read as pyinfra reads it, its fix
    assert reads(log) == 1 + 2


def test_a_host_function_marks_the_run_as_changing(files, monkeypatch):
    from operations.core.remote import HostFunction

    state = State(Inventory((["@local"], {})), Config())
    HostFunction(lambda state, host, shell: True, [], {}).execute(state, state.inventory.get_host("@local"), {})
    assert fact_reads.fact_reads(state).ran


@operation()
def record_digest(path, record):
    """Records the SHA-256 pyinfra's own Sha256File reads (a fact that keeps its path on itself)."""
    digest = host.get_fact(Sha256File, path=path)
    if not os.path.exists(record) or open(record).read() != digest:
        yield f"printf %s {digest} > {record}"


def test_pyinfra_s_own_facts_answer_from_the_one_command(files, monkeypatch):
    value, _ = files
    record = value.parent / "digest"
    run((record_digest, {"path": str(value), "record": str(record)}), monkeypatch=monkeypatch)
    commands = []
    metas = run(
        (record_digest, {"path": str(value), "record": str(record)}), monkeypatch=monkeypatch, commands=commands
    )
    assert not metas[0].did_change() and len(commands) == 1
    assert record.read_text() == hashlib.sha256(b"a\n").hexdigest()


def test_a_run_that_changes_learns_what_it_asks_after_its_change_too(files, monkeypatch):
    value, log = files
    monkeypatch.setattr(pyinfra_host, "get_fact", pyinfra_host.get_fact)
    fact_reads.install()
    state = State(Inventory((["@local"], {})), Config())
    connect_all(state)
    local = state.inventory.get_host("@local")
    fact_reads.something_runs(state)  # as after an operation's first command
    assert local.get_fact(Value, path=str(value), log=str(log)) == "a"
    assert local.get_fact(Value, path=str(value), log=str(log)) == "a"
    assert reads(log) == 2  # read as pyinfra reads it, each time
    (learned,) = fact_reads.fact_reads(state).learned["@local"].now.values()
    assert [entry["command"] for entry in learned.values()] == [f"printf x >> {log}; cat {value}"]


def test_an_ask_while_the_one_command_runs_waits_for_it(files, monkeypatch):
    both = two_files(files)
    run((ensure_both, both), monkeypatch=monkeypatch)  # learned
    state = State(Inventory((["@local"], {})), Config())
    connect_all(state)
    local = state.inventory.get_host("@local")
    commands, original = [], local.run_shell_command

    def counted(command, **arguments):
        commands.append(str(command))
        return original(command, **arguments)

    monkeypatch.setattr(local, "run_shell_command", counted)
    asks = [
        gevent.spawn(local.get_fact, Value, path=path, log=both["log"]) for path in (both["first"], both["second"]) * 2
    ]  # four askers at once, as other hosts ask this one
    gevent.joinall(asks, raise_error=True)
    assert [ask.value for ask in asks] == ["a"] * 4 and len(commands) == 1
