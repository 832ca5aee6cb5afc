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

A fact whose answer follows from files alone says which (``state_files``: apt's answers follow from
its sources, lists, preferences and dpkg's status): the script fingerprints them (every entry's path,
size, inode and ctime, which no tool can set back) before it runs the command, and keeps the answer
and fingerprint in the record. Next run, while the fingerprint is the same, the script skips the
command (``apt-cache policy`` and ``show`` for the driver's packages: 0.26 CPU s of a lab host's
no-op) and the kept answer stands; anything changed there, and it runs again. Kept answers are
written down as they came: a fact whose answer may hold a secret must not name files.
"""

import base64
import hashlib
import io
import json
import os
import pathlib
import shlex
import tarfile

from pyinfra.api import StringCommand
from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import _MISSING_COMMAND_MARKER, _make_command

_MARK = "##gpufleet-fact"
_FORMAT = 2
_UNCHANGED = "same"  # a status: the fact's files are as when its kept answer was read
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


def fingerprint_command(paths):
    """Prints one line that changes when any entry under ``paths`` is added, removed, replaced, resized
    or written (find's ``%C@``: the ctime, to the nanosecond where the file system keeps it)."""
    quoted = " ".join(shlex.quote(path) for path in paths)
    return f"find {quoted} -printf '%p %s %i %C@\\n' 2>/dev/null | cksum"


def script(commands, unchanged=None):
    """One POSIX shell script that runs each of ``commands`` in its own subshell, stdin empty (as
    pyinfra gives a fact, and the script itself may come on stdin), stderr dropped, its stdout kept in
    a file of its number and its exit status in ``status``; then prints those files as one gzipped
    tar in base64 on one line (mktemp, tar, gzip and base64 once for the whole batch, not a base64 per
    fact). ``unchanged``: ``{number: (paths, fingerprint or None)}``: that command's files are
    fingerprinted first (in ``N.files``), and where that is the fingerprint given, its status is
    ``same`` and it does not run."""
    unchanged = unchanged or {}
    parts = ["d=$(mktemp -d) || exit 1", "trap 'rm -rf \"$d\"' EXIT"]
    for number, command in enumerate(commands):
        run = f'( {command}\n) </dev/null >"$d/{number}" 2>/dev/null; echo "{number} $?" >>"$d/status"'
        if number in unchanged:
            paths, fingerprint = unchanged[number]
            parts.append(f'{fingerprint_command(paths)} >"$d/{number}.files"')
            if fingerprint:
                same = f'read -r f <"$d/{number}.files"; [ "$f" = {shlex.quote(fingerprint)} ]'
                run = f'if {same}; then echo "{number} {_UNCHANGED}" >>"$d/status"; else\n{run}; fi'
        parts.append(run)
    parts.append(f'echo "{_MARK}"; (cd "$d" && tar -cf - .) | gzip -1 | base64 -w0; echo')
    return "\n".join(parts)


def archived(lines):
    """``{file name: bytes}`` of the script's archive, from its output lines (the line after the mark); empty when unreadable."""
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


def outputs(files, kept=None):
    """``{number: stdout lines}`` of the commands that exited 0, from the script's ``archived`` files,
    each split as pyinfra splits a command's stdout; a command skipped as unchanged answers its
    ``kept`` lines (``{number: lines}``)."""
    found, kept = {}, kept or {}
    for status in files.get("status", b"").decode().splitlines():
        number, _, code = status.partition(" ")
        if code == _UNCHANGED and int(number) in kept:
            found[int(number)] = kept[int(number)]
        if code != "0" or number not in files:
            continue
        try:
            text = files[number].decode("utf-8")
        except ValueError:
            continue
        split = text.split("\n")
        found[int(number)] = split[:-1] if split[-1] == "" else split
    return found


def fingerprints(files):
    """``{number: fingerprint}`` of the commands whose files the script fingerprinted, from its
    ``archived`` files."""
    return {
        int(name.partition(".")[0]): data.decode(errors="replace").strip()
        for name, data in files.items()
        if name.endswith(".files")
    }


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
    """The facts one host was asked for, ``{how key: {fact key: {"command": ..., "files": [...]}}}``,
    and the answers kept of those with files, ``{how key: {fact key: {"command", "files",
    "fingerprint", "lines"}}}``: read from and written to its record on the control node."""

    def __init__(self, path):
        self.path = path
        self.before, self.kept_before = self._read()
        self.now, self.kept_now = {}, {}

    def _read(self):
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}, {}
        if record.get("format") != _FORMAT:
            return {}, {}
        return record.get("batches", {}), record.get("kept", {})

    def asked(self, how, key, command, files=()):
        self.now.setdefault(how, {})[key] = {"command": command, "files": list(files)}

    def batch(self, how):
        """``[(fact key, command, files)]`` the last run asked for with ``how``."""
        return [(key, entry["command"], entry["files"]) for key, entry in sorted(self.before.get(how, {}).items())]

    def kept(self, how, key, command, files):
        """``(fingerprint, lines)`` kept of this read (the same command, the same files), or None."""
        entry = self.kept_before.get(how, {}).get(key)
        if entry and entry["command"] == command and entry["files"] == list(files):
            return entry["fingerprint"], entry["lines"]
        return None

    def keep(self, how, key, command, files, fingerprint, lines):
        self.kept_now.setdefault(how, {})[key] = {
            "command": command, "files": list(files), "fingerprint": fingerprint, "lines": lines,
        }  # fmt: skip

    def save(self):
        """Write what this run asked (atomically; the directory the user's alone)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            json.dump({"format": _FORMAT, "batches": self.now, "kept": self.kept_now}, out, sort_keys=True)
        partial.replace(self.path)


def record_path(host):
    """Where ``host``'s record is kept: named by its inventory name and where its SSH connection goes."""
    root = os.environ.get("GPUFLEET_FACT_CACHE") or os.path.expanduser("~/.cache/gpufleet/facts")
    who = "\0".join(str(host.data.get(key) or "") for key in ("ssh_hostname", "ssh_port", "ssh_user"))
    name = hashlib.sha256(f"{host.name}\0{who}".encode()).hexdigest()[:32]
    return pathlib.Path(root) / f"{name}.json"
