"""
A host's facts read in one command: the facts its last run asked for, each its own command and
parsed by its own ``process``, in one shell script over one SSH round trip.

What a run asks a host is learned from the run before (the same deploy on a converged host asks the
same questions): kept on the control node, per host, as each fact's key and the exact command it
ran, under ``$GPUFLEET_FACT_CACHE`` (default ``~/.cache/gpufleet/facts``, the user's own, mode
0700). An answer read this way stands only for a fact whose command today is that same command
(gpufleet or pyinfra updated: read as usual), and only while nothing has run on any host
(``fact_reads``); a fact the script did not answer cleanly (exit status other than 0, a missing
command, output its ``process`` refused) is read again on its own, as pyinfra reads it. So a stale or
missing record costs round trips, never a wrong answer. Commands that carry a masked value (a
secret) are never written down, and neither are the connector's passwords or environments.
"""

import base64
import hashlib
import io
import json
import os
import pathlib
import tarfile

from pyinfra.api import StringCommand
from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import _MISSING_COMMAND_MARKER, _make_command

_MARK = "##gpufleet-fact"
_FORMAT = 1
# connector arguments never written down: passwords (which do not change what a read answers), and
# environments and stdin (which may carry secrets; reads that use them are not batched)
PASSWORDS = ("_sudo_password", "_su_password")
_SECRET_HOW = (*PASSWORDS, "_env", "_stdin")
# connector arguments about retrying a command, not about how a fact's command runs
NOT_HOW = ("_retries", "_retry_delay", "_retry_until", "_temp_dir")


def fact_command(fact, fact_kwargs):
    """The command pyinfra runs for ``fact`` (an instance) with ``fact_kwargs``, its ``requires_command``
    guard included (pyinfra.api.facts._get_fact builds the same)."""
    command = _make_command(fact.command, dict(fact_kwargs))
    required = _make_command(fact.requires_command, dict(fact_kwargs))
    if required:
        command = StringCommand(
            "if", "command", "-v", required, ">/dev/null", "2>&1;", "then", "(", command, ");",
            "else", "echo", f"'{_MISSING_COMMAND_MARKER}';", "fi",
        )  # fmt: skip
    return command if isinstance(command, StringCommand) else StringCommand(command)


def writable(command):
    """The command's shell text, or None where part of it is masked (a secret pyinfra hides in logs)."""
    raw = command.get_raw_value()
    return raw if command.get_masked_value() == raw else None


def how_key(executor_kwargs):
    """Which batch a fact's read joins: its connector arguments, or None where they cannot be written
    down or would change a read's meaning (an environment, stdin, exit codes taken as success)."""
    if executor_kwargs.get("_env") or executor_kwargs.get("_stdin"):
        return None
    if list(executor_kwargs.get("_success_exit_codes") or [0]) != [0]:
        return None
    kept = sorted((key, value) for key, value in executor_kwargs.items() if key not in (*_SECRET_HOW, *NOT_HOW))
    return repr(kept)


def script(commands):
    """One POSIX shell script that runs each of ``commands`` in its own subshell, stdin empty (as
    pyinfra gives a fact, and the script itself may come on stdin), stderr dropped, its stdout kept in
    a file of its number and its exit status in ``status``; then prints those files as one gzipped
    tar in base64 on one line (mktemp, tar, gzip and base64 once for the whole batch, not a base64 per
    fact)."""
    parts = ["d=$(mktemp -d) || exit 1", "trap 'rm -rf \"$d\"' EXIT"]
    for number, command in enumerate(commands):
        parts.append(f'( {command}\n) </dev/null >"$d/{number}" 2>/dev/null; echo "{number} $?" >>"$d/status"')
    parts.append(f'echo "{_MARK}"; (cd "$d" && tar -cf - .) | gzip -1 | base64 -w0; echo')
    return "\n".join(parts)


def _archived(lines):
    """``{file name: bytes}`` of the script's archive (the line after the mark); empty when unreadable."""
    lines = list(lines)
    encoded = lines[lines.index(_MARK) + 1] if _MARK in lines[:-1] else ""
    try:
        data = base64.b64decode(encoded, validate=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            return {
                pathlib.PurePath(member.name).name: archive.extractfile(member).read()
                for member in archive
                if member.isfile()
            }
    except (ValueError, OSError, EOFError, tarfile.TarError):
        return {}


def outputs(lines):
    """``{number: stdout lines}`` of the commands that exited 0, from the script's output lines, each
    split as pyinfra splits a command's stdout."""
    files, found = _archived(lines), {}
    for status in files.get("status", b"").decode().splitlines():
        number, _, code = status.partition(" ")
        if code != "0" or number not in files:
            continue
        try:
            text = files[number].decode("utf-8")
        except ValueError:
            continue
        split = text.split("\n")
        found[int(number)] = split[:-1] if split[-1] == "" else split
    return found


def answer(fact, lines):
    """What ``fact`` makes of ``lines`` as pyinfra would (default for no output); raises LookupError where
    pyinfra would not answer this way (the required command is missing, the output is refused)."""
    if lines == [_MISSING_COMMAND_MARKER]:
        raise LookupError("required command missing")
    if not lines:
        return fact.default()
    try:
        return fact.process(lines)
    except FactProcessError as error:
        raise LookupError(str(error)) from error


class Learned:
    """The facts one host was asked for: ``{how key: {fact key: command}}``, read from and written to
    its record on the control node."""

    def __init__(self, path):
        self.path = path
        self.before = self._read()
        self.now = {}

    def _read(self):
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return record.get("batches", {}) if record.get("format") == _FORMAT else {}

    def asked(self, how, key, command):
        self.now.setdefault(how, {})[key] = command

    def batch(self, how):
        """``[(fact key, command)]`` the last run asked for with ``how``."""
        return sorted(self.before.get(how, {}).items())

    def save(self):
        """Write what this run asked (atomically; the directory the user's alone)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            json.dump({"format": _FORMAT, "batches": self.now}, out, sort_keys=True)
        partial.replace(self.path)


def record_path(host):
    """Where ``host``'s record is kept: named by its inventory name and where its SSH connection goes."""
    root = os.environ.get("GPUFLEET_FACT_CACHE") or os.path.expanduser("~/.cache/gpufleet/facts")
    who = "\0".join(str(host.data.get(key) or "") for key in ("ssh_hostname", "ssh_port", "ssh_user"))
    name = hashlib.sha256(f"{host.name}\0{who}".encode()).hexdigest()[:32]
    return pathlib.Path(root) / f"{name}.json"
