"""
Commands gpufleet runs on a host outside pyinfra's command runner: byte streams on their own SSH
channel (staging, secrets, relay keys). Each goes through the same privilege wrapper pyinfra puts
around its own commands (``_sudo``, ``_sudo_user``, ``_sudo_password``, ``_su_user``, ``_doas`` ...),
so a sudo login works like a root one; commands that act for the login user itself (its own
``authorized_keys``) run without it.
"""

import errno
import fcntl
import os
import shlex
import shutil

import gevent
from gevent import subprocess
from gevent.threadpool import ThreadPool
from pyinfra import logger
from pyinfra.api import FactBase, FunctionCommand, StringCommand
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.connectors.util import make_unix_command_for_host

from operations.core import fact_reads, liveness
from operations.core.errors import ConfigError

# Connector arguments that say how a command runs (not what runs): kept out of the command line.
_RUN_ONLY = (
    "_get_pty",
    "_timeout",
    "_stdin",
    "_success_exit_codes",
    "_retries",
    "_retry_delay",
    "_retry_until",
    "_temp_dir",
)


class FileSpan:
    """A frame that is ``count`` bytes of the open file ``handle`` from ``offset``: a stream moves
    them without reading them into this process where it can (``os.splice`` into the OpenSSH
    client's pipe); ``blocks()`` reads them for one that cannot (pyinfra's channel)."""

    def __init__(self, handle, offset, count):
        self.handle, self.offset, self.count = handle, offset, count

    def short(self):
        return OSError(f"{self.handle.name}: shorter than the manifest says (the source changed)")

    def blocks(self, size=1 << 20):
        self.handle.seek(self.offset)
        left = self.count
        while left:
            block = self.handle.read(min(size, left))
            if not block:
                raise self.short()
            left -= len(block)
            yield block

    def splice_into(self, pipe):
        """Move the span into the blocking pipe ``pipe`` (a descriptor) without copying it through
        this process (call it on a thread of its own: it waits while the pipe is full). False, with
        nothing moved, where the source's file system cannot splice (the caller writes blocks)."""
        offset, end = self.offset, self.offset + self.count
        while offset < end:
            try:
                moved = os.splice(self.handle.fileno(), pipe, end - offset, offset_src=offset)
            except OSError as error:
                if offset == self.offset and error.errno in (errno.EINVAL, errno.ENOSYS):
                    return False
                raise
            if not moved:
                raise self.short()
            offset += moved
        return True


def _write_frame(pipe, frame):
    """Write ``frame`` (bytes or a ``FileSpan``) whole into the blocking pipe ``pipe``."""
    if isinstance(frame, FileSpan):
        if frame.splice_into(pipe):
            return
        blocks = frame.blocks()  # a file system without splice
    else:
        blocks = (frame,)
    for block in blocks:
        view = memoryview(block)
        while view:
            view = view[os.write(pipe, view) :]


def frame_bytes(frames):
    """``frames`` with each ``FileSpan`` read into blocks: what a stream of plain bytes takes."""
    for frame in frames:
        if isinstance(frame, FileSpan):
            yield from frame.blocks()
        else:
            yield frame


class Shell:
    """A host's shell with one set of privilege arguments (an operation's, or none: the login user)."""

    def __init__(self, state, host, arguments):
        self.state, self.host = state, host
        self.arguments = {key: value for key, value in arguments.items() if key in CONNECTOR_ARGUMENT_KEYS}

    @classmethod
    def of(cls, state, host):
        """``host``'s shell with the privilege its own data asks for (a seed serving another host)."""
        arguments, _ = pop_global_arguments(state, host, {})
        return cls(state, host, arguments)

    def login(self):
        """The same host as its login user, with no sudo/su/doas around the commands."""
        return Shell(self.state, self.host, {})

    def wrap(self, command):
        """``command`` as the host will run it (``sudo -H -n sh -c '...'`` for a sudo login)."""
        arguments = {key: value for key, value in self.arguments.items() if key not in _RUN_ONLY}
        return make_unix_command_for_host(self.state, self.host, StringCommand(command), **arguments).get_raw_value()

    def run(self, command):
        """Run ``command``; return its stdout lines, or raise naming the host, command and error."""
        status, output = self.host.connector.run_shell_command(StringCommand(command), **self.arguments)
        if not status:
            raise OSError(f"{self.host.name}: {command}: {output.stderr}")
        return output.stdout_lines

    def stream(self, command, frames):
        """Run ``command`` with ``frames`` (an iterable of bytes and ``FileSpan``) as its stdin, on a
        channel of its own.

        Returns ``(exit status, stdout lines, stderr)``; a command that stops reading ends the stream.
        """
        channel = self.host.connector.client.get_transport().open_session()
        try:
            channel.exec_command(self.wrap(command))
            for frame in frame_bytes(frames):
                try:
                    channel.sendall(frame)
                except OSError:
                    break  # the command stopped reading: its exit status and output say why
            else:
                channel.shutdown_write()
            stdout = channel.makefile("rb").read().decode()
            stderr = channel.makefile_stderr("rb").read().decode()
            status = channel.recv_exit_status()
        finally:
            channel.close()
        return status, stdout.splitlines(), stderr

    def stream_bulk(self, command, frames):
        """``stream`` for bulk bytes (staging): through the OpenSSH client when ``openssh_argv`` can
        reach the host that way (its AES-GCM runs in native code, outside this process, while this
        process reads and hashes), else on pyinfra's own connection. ``frames`` is a callable
        returning a fresh iterable: if the client cannot connect at all, it starts again on
        pyinfra's connection."""
        argv = (
            openssh_argv(self.host, self.wrap(command))
            if self.host.data.gpufleet_stage_transport == "openssh" and not self.arguments.get("_sudo_password")
            else None
        )
        if argv:
            status, lines, stderr = _openssh_stream(argv, frames())
            if status != 255 or lines:
                self.bulk_transport = "the OpenSSH client"
                return status, lines, stderr
            logger.warning(
                f"[{self.host.name}] the OpenSSH client could not reach the host ({stderr.strip()}); "
                "staging on pyinfra's connection instead (gpufleet_stage_transport = 'paramiko' skips "
                "the attempt)"
            )
        self.bulk_transport = "pyinfra's connection"
        return self.stream(command, frames())

    def send(self, command, data):
        """Run ``command`` with ``data`` (bytes or text) as its stdin; raise if it fails. The data
        never appears in a command line, so a secret sent this way shows in no process list."""
        status, _, stderr = self.stream(command, [data if isinstance(data, bytes) else data.encode()])
        if status:
            raise OSError(f"{self.host.name}: {command}: {stderr.strip()}")


# OpenSSH's AES-GCM first (the cipher gpufleet's paramiko connection is pinned to), then its default.
OPENSSH_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"


def openssh_argv(host, remote_command):
    """The OpenSSH client's command line that runs ``remote_command`` on ``host``, reaching it as
    pyinfra's SSH connector does: its hostname, port, user, key, config file, known_hosts and host key
    checking (the flags pyinfra's own ``rsync`` passes), never prompting (``BatchMode``). None when
    this control node has no ``ssh``, the host is not reached over pyinfra's SSH connector, or the
    login needs what a prompt would ask (a password, a key passphrase)."""
    if not shutil.which("ssh") or type(host.connector).__name__ != "SSHConnector":
        return None
    data = host.connector.data  # the connector's settings, its defaults filled in
    if data.get("ssh_password") or data.get("ssh_key_password"):
        return None
    argv = [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=30",
        *liveness.openssh_options(data),
        "-c",
        OPENSSH_CIPHERS,
    ]
    if data.get("ssh_config_file"):
        argv += ["-F", str(data["ssh_config_file"])]
    if data.get("ssh_known_hosts_file"):
        argv += ["-o", f"UserKnownHostsFile={data['ssh_known_hosts_file']}"]
    argv += ["-o", f"StrictHostKeyChecking={data.get('ssh_strict_host_key_checking') or 'accept-new'}"]
    for flag, key in (("-p", "ssh_port"), ("-l", "ssh_user"), ("-i", "ssh_key")):
        if data.get(key):
            argv += [flag, str(data[key])]
    return [*argv, "--", str(data.get("ssh_hostname") or host.name), remote_command]


def _openssh_stream(argv, frames):
    """Run ``argv`` with ``frames`` as its stdin; ``(exit status, stdout lines, stderr)``, as
    ``Shell.stream``. The frames go into the client's pipe from a thread of this stream's own, in
    blocking writes (other hosts' greenlets run meanwhile): a ``FileSpan`` moves from the page cache
    with ``os.splice``, never copied through this process, and nothing wakes this process's event
    loop each time the client drains a few KiB of the pipe."""
    read_end, write_end = os.pipe()
    try:  # as large as a frame's block: one write per block, not sixteen waits on a 64 KiB pipe
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    try:
        process = subprocess.Popen(argv, stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    readers = [gevent.spawn(process.stdout.read), gevent.spawn(process.stderr.read)]
    writer = ThreadPool(1)
    try:
        for frame in frames:
            writer.apply(_write_frame, (write_end, frame))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command stopped reading: its exit status and output say why
    finally:  # also when the source fails mid-stream: the receiver sees the end, keeps its part, exits
        os.close(write_end)
        writer.kill()
        stdout, stderr = (reader.get() for reader in readers)
        status = process.wait()
    return status, stdout.decode().splitlines(), stderr.decode()


class HostFunction(FunctionCommand):
    """A FunctionCommand called as ``function(state, host, shell, *args)``, where ``shell`` runs
    commands with the operation's own privilege arguments (pyinfra's FunctionCommand drops them)."""

    def execute(self, state, host, connector_arguments):
        fact_reads.something_runs(state)  # what the host answered before may be stale from here on
        return self.function(state, host, Shell(state, host, connector_arguments), *self.args, **self.kwargs)


def write_file_command(dest, mode="600", owner="root:root"):
    """A command that writes its stdin to ``dest`` atomically, created with ``mode`` from the first byte
    (``owner``: ``USER:GROUP``, names or numbers)."""
    tmp = shlex.quote(f"{dest}.gpufleet-new")
    return (
        f"umask 077 && cat > {tmp} && chmod {mode} {tmp} && chown {shlex.quote(owner)} {tmp} && "
        f"mv -f {tmp} {shlex.quote(dest)}"
    )


class LoginPrivilege(FactBase):
    """
    Returns who the SSH login is and whether it can become root without a prompt (``sudo -n true``),
    read without any privilege wrapper (call with ``_sudo=False``):

    .. code:: python

        {"uid": 1000, "user": "gpufleet", "sudo_ok": False,
         "sudo_message": "sudo: a password is required"}
    """

    def command(self):
        return (
            'echo "uid=$(id -u) user=$(id -un)"; '
            'if command -v sudo >/dev/null 2>&1; then sudo -n true 2>&1; echo "sudo_rc=$?"; '
            'else echo "sudo: command not found"; echo sudo_rc=127; fi'
        )

    def process(self, output):
        head = dict(part.split("=", 1) for part in output[0].split())
        rc = int(output[-1].split("=", 1)[1])
        return {
            "uid": int(head["uid"]),
            "user": head["user"],
            "sudo_ok": rc == 0,
            "sudo_message": " ".join(line.strip() for line in output[1:-1]) or f"exit {rc}",
        }


class PrivilegeWorks(FactBase):
    """Returns the login's user id after the operation's privilege wrapper: 0 when it became root."""

    def command(self):
        return "id -u"

    def process(self, output):
        return int(output[0])


def require_root(host):
    """
    Refuse, before any host changes, a login that cannot act as root: not root and no privilege
    wrapper set, or a wrapper that fails (``sudo -n true`` without ``_sudo_password``; the wrapper
    itself with one). Names the host, the login and what was tried.
    """
    login = host.get_fact(LoginPrivilege, _sudo=False, _su_user=None, _doas=False, _dzdo=False)
    if login["uid"] == 0:
        return
    arguments, _ = pop_global_arguments(host.state, host, {})
    who = f"logs in as {login['user']} (uid {login['uid']})"
    wrappers = [key for key in ("_sudo", "_su_user", "_doas", "_dzdo") if arguments.get(key)]
    if not wrappers:
        raise ConfigError(
            "_sudo",
            f"{who}, not root, and no privilege wrapper is set: set `_sudo = True` "
            "in its data (or pass --sudo), or log in as root",
            host=host.name,
        )
    if wrappers == ["_sudo"] and not arguments.get("_sudo_password") and not arguments.get("_sudo_user"):
        if not login["sudo_ok"]:
            raise ConfigError(
                "_sudo",
                f"{who}; tried `sudo -n true`: {login['sudo_message']}. Give "
                f"{login['user']} passwordless sudo, or set `_sudo_password`",
                host=host.name,
            )
        return
    became = host.get_fact(PrivilegeWorks, _ignore_errors=True)
    if became != 0:
        tried = ", ".join(
            f"{key}={'***' if key.endswith('password') else arguments[key]!r}"
            for key in (*wrappers, "_sudo_password", "_sudo_user")
            if arguments.get(key)
        )
        raise ConfigError(
            wrappers[0],
            f"{who}; tried `id -u` through {tried}: it did not run as root "
            f"({'failed' if became is None else f'uid {became}'})",
            host=host.name,
        )
