"""
A host's facts read once per run while nothing changes, most of them in one command.

pyinfra 3 runs a fact's command each time it is asked: when it prepares the run (to show what would
change before its prompt), again when it executes each operation, and again for each operation that
asks the same question (files.put and files.directory read each path's stat and digest, systemd's
operations read ``systemctl show``, apt's read ``dpkg -l``); each is an SSH round trip. ``install``
answers ``host.get_fact`` from the run's earlier read of the same fact (the fact, its arguments and
how it runs, privilege included) while no operation on any host has run anything: no command, no
upload, no function (each command class pyinfra runs, and gpufleet's own ``HostFunction``, says so
before it runs). From the first such moment on, every fact is read as pyinfra reads it.

The first read of a host (in each way of running, e.g. with sudo) reads every fact the host's last
run asked for in one command (``fact_batch``). On a converged host nothing runs, so the whole run
is answered from that read: one round trip per host where pyinfra takes one per fact and operation
(counted: tests/e2e/test_deploy.py::test_a_converged_host_runs_few_commands).
"""

import copy

import gevent.event
from pyinfra import logger
from pyinfra.api import command as pyinfra_command
from pyinfra.api import host as pyinfra_host
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.api.facts import FactBase, _handle_fact_kwargs
from pyinfra.api.state import BaseStateCallback

from operations.core import fact_batch

# the command classes an operation yields; each marks the run as changing before it runs
_COMMAND_CLASSES = ("StringCommand", "FileUploadCommand", "FileDownloadCommand", "FunctionCommand", "RsyncCommand")


class FactReads(BaseStateCallback):
    """One run's reads: answers kept while nothing has run, and what each host was asked."""

    def __init__(self):
        self.ran = False  # an operation on some host has run something
        self.answers = {}  # (host name, fact key) -> answer
        self.learned = {}  # host name -> fact_batch.Learned
        self.batched = {}  # (host name, how key) -> Event set once its one command has been read

    def host_disconnect(self, state, host):
        learned = self.learned.get(host.name)
        if learned is not None and host not in state.failed_hosts:
            try:
                learned.save()
            except OSError as error:
                logger.warning(f"[{host.name}] its facts' record not kept ({learned.path}): {error}")

    def learn(self, host):
        if host.name not in self.learned:
            self.learned[host.name] = fact_batch.Learned(fact_batch.record_path(host))
        return self.learned[host.name]


def fact_reads(state):
    """The run's ``FactReads``, made and registered with pyinfra's state on first use."""
    reads = getattr(state, "gpufleet_fact_reads", None)
    if reads is None:
        reads = state.gpufleet_fact_reads = FactReads()
        state.add_callback_handler(reads)
    return reads


def something_runs(state):
    """Say that an operation is about to run something on a host: from now on facts are read again."""
    fact_reads(state).ran = True


def fact_key(cls, fact_kwargs, executor_kwargs):
    """What makes two reads of a fact the same read: the fact, its arguments and how it runs."""
    arguments = sorted((key, value) for key, value in fact_kwargs.items() if key != "self")
    how = sorted(
        (key, value)
        for key, value in executor_kwargs.items()
        if key not in (*fact_batch.PASSWORDS, *fact_batch.NOT_HOW)
    )
    return repr((cls.__module__, cls.__qualname__, arguments, how))


class _Asked:
    """One ask of a fact: its key, the instance that makes its command, the command's shell text (None:
    masked), its batch (None: not batched) and the connector arguments it runs with."""

    def __init__(self, state, host, cls, args, kwargs):
        fact_kwargs, global_kwargs = _handle_fact_kwargs(state, host, cls, args, kwargs)  # pyinfra's own split
        self.executor_kwargs = {key: global_kwargs[key] for key in CONNECTOR_ARGUMENT_KEYS if key in global_kwargs}
        if cls.shell_executable:
            self.executor_kwargs["_shell_executable"] = cls.shell_executable
        self.key = fact_key(cls, fact_kwargs, self.executor_kwargs)
        self.fact = cls()
        self.command = fact_batch.writable(fact_batch.fact_command(self.fact, fact_kwargs))
        self.how = fact_batch.how_key(self.executor_kwargs) if self.command is not None else None
        self.files = tuple(getattr(cls, "state_files", ()))  # what its answer follows from (fact_batch)


def _batchable(cls):
    """A plain fact: pyinfra would read it with one command and no other fact before it."""
    return issubclass(cls, FactBase) and cls.check_preconditions is FactBase.check_preconditions


def _batch_read(state, host, reads, asked):
    """Read every fact ``host``'s last run asked with ``how`` in one command, once per run: the first
    asker reads, another asking meanwhile (another host's question to this one) waits for it."""
    read = reads.batched.get((host.name, asked.how))
    if read is not None:
        read.wait()
        return
    read = reads.batched[(host.name, asked.how)] = gevent.event.Event()
    try:
        _read_batch(state, host, reads, asked.how, asked.executor_kwargs)
    finally:
        read.set()


def _read_batch(state, host, reads, how, executor_kwargs):
    """Keep the clean answers of one command reading every fact ``host``'s last run asked with ``how``;
    a fact with files keeps the answer its files had, for the next run."""
    learned = reads.learn(host)
    entries = learned.batch(how)
    if not entries or not host.connected:
        return
    unchanged, kept = {}, {}  # the fingerprints the script compares, the answers kept behind them
    for number, (key, command, files) in enumerate(entries):
        if files:
            fingerprint, lines = learned.kept(how, key, command, files) or (None, None)
            unchanged[number] = (files, fingerprint)
            if fingerprint:
                kept[number] = lines
    try:
        # The script goes on stdin: sudo logs a command's arguments (the script is tens of kB) to the
        # host's auth log on every run. A failed script answers nothing: its facts are read alone.
        _, output = host.run_shell_command(
            pyinfra_command.StringCommand("sh", "-s"),
            print_output=state.print_fact_output,
            print_input=state.print_fact_input,
            **{**executor_kwargs, "_stdin": fact_batch.script([command for _, command, _ in entries], unchanged)},
        )
    except Exception as error:  # a lost or frozen connection: each fact's own read will say so
        logger.debug(f"[{host.name}] facts not read in one command: {error}")
        return
    if reads.ran:
        return  # something ran meanwhile: what was read may be stale
    files = fact_batch.archived(output.stdout_lines)
    found, fingerprints = fact_batch.outputs(files, kept), fact_batch.fingerprints(files)
    for number, lines in found.items():
        key, command, files = entries[number]
        reads.answers[(host.name, key)] = ("batch", command, lines)
        if number in fingerprints:
            learned.keep(how, key, command, files, fingerprints[number], lines)


def _kept(reads, host, asked):
    """The answer kept for this ask, or LookupError (lines read in one command are processed by the
    ask's own instance: a fact may keep its arguments on itself for ``process``)."""
    kept = reads.answers.get((host.name, asked.key))
    if kept is None:
        raise LookupError(asked.key)
    if kept[0] == "read":
        return kept[1]
    _, read_command, lines = kept
    if read_command != asked.command:
        raise LookupError("the fact's command changed since it was learned")
    answer = fact_batch.answer(asked.fact, lines)
    reads.answers[(host.name, asked.key)] = ("read", answer)
    return answer


def install():
    """Route every ``host.get_fact`` of this process through the run's reads (once), and mark each
    command class as something that runs."""
    read = pyinfra_host.get_fact
    if getattr(read, "gpufleet_fact_reads", False):
        return
    for name in _COMMAND_CLASSES:
        _mark_runs(getattr(pyinfra_command, name))

    def get_fact(state, host, cls, args=None, kwargs=None, **options):
        if options or not _batchable(cls):
            return read(state, host, cls, args=args, kwargs=kwargs, **options)
        reads, asked = fact_reads(state), _Asked(state, host, cls, args, kwargs)
        if asked.how is not None:
            reads.learn(host).asked(asked.how, asked.key, asked.command, asked.files)
        if reads.ran:
            return read(state, host, cls, args=args, kwargs=kwargs)
        if asked.how is not None:
            _batch_read(state, host, reads, asked)
        try:
            return copy.deepcopy(_kept(reads, host, asked))
        except LookupError:
            pass
        answer = read(state, host, cls, args=args, kwargs=kwargs)
        if not reads.ran:
            reads.answers[(host.name, asked.key)] = ("read", answer)
        return copy.deepcopy(answer)

    get_fact.gpufleet_fact_reads = True
    pyinfra_host.get_fact = get_fact


def _mark_runs(command_class):
    execute = command_class.execute
    if getattr(execute, "gpufleet_marks", False):
        return

    def marked(self, state, host, connector_arguments):
        something_runs(state)
        return execute(self, state, host, connector_arguments)

    marked.gpufleet_marks = True
    command_class.execute = marked
