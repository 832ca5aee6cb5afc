"""
The services' own system accounts: one account and group of the same name, no login, no home.

pyinfra's ``server.user`` reads every account on the host, with ``lastlog`` and the shadow entry of
each, to learn about one; a service account needs its own ``/etc/passwd`` and ``/etc/group``
entries only (``getent``), read in one command.
"""

import shlex

from pyinfra import host
from pyinfra.api import FactBase, OperationError, operation

NO_LOGIN = "/usr/sbin/nologin"
NO_HOME = "/nonexistent"


class SystemAccount(FactBase):
    """
    Returns an account's ``/etc/passwd`` entry and its same-named group's id (``getent``); None for
    either that is not there:

    .. code:: python

        {"user": {"uid": 60600, "gid": 60600, "home": "/nonexistent", "shell": "/usr/sbin/nologin"},
         "group": 60600}
    """

    def command(self, account):
        quoted = shlex.quote(account)
        return f"getent passwd {quoted} || echo -; getent group {quoted} || echo -"

    def process(self, output):
        lines = [line for line in output if line.strip()]
        user = group = None
        if lines and lines[0] != "-":
            fields = lines[0].split(":")
            user = {"uid": int(fields[2]), "gid": int(fields[3]), "home": fields[5], "shell": fields[6]}
        if len(lines) > 1 and lines[1] != "-":
            group = int(lines[1].split(":")[2])
        return {"user": user, "group": group}


def account_commands(name, uid, gid, found):
    """What makes ``name`` a system account with ``uid``, in its own group ``gid``, without login or
    home (pure: unit-tested); ``found`` is ``SystemAccount``'s answer. Nothing when it is one."""
    quoted = shlex.quote(name)
    commands = []
    if found["group"] is None:
        commands.append(f"groupadd --system --gid {int(gid)} {quoted}")
    elif found["group"] != gid:
        commands.append(f"groupmod --gid {int(gid)} {quoted}")
    user = found["user"]
    if user is None:
        commands.append(
            f"useradd --system --uid {int(uid)} --gid {quoted} --shell {NO_LOGIN} "
            f"--home-dir {NO_HOME} --no-create-home {quoted}"
        )
        return commands
    changes = []
    if user["uid"] != uid:
        changes.append(f"--uid {int(uid)}")
    if user["gid"] != gid:
        changes.append(f"--gid {quoted}")
    if user["shell"] != NO_LOGIN:
        changes.append(f"--shell {NO_LOGIN}")
    if user["home"] != NO_HOME:
        changes.append(f"--home {NO_HOME}")
    if changes:
        commands.append(f"usermod {' '.join(changes)} {quoted}")
    return commands


@operation()
def service_account(user: str, uid: int, gid: int):
    """
    A system account ``user`` with ``uid``, in a group of its own name with ``gid``, with no login
    shell and no home: what a service's containers run as.

    + user: the account's (and its group's) name
    + uid, gid: their ids
    """
    if not isinstance(uid, int) or not isinstance(gid, int):
        raise OperationError(f"{host.name}: {user}: uid and gid must be numbers, not {uid!r}, {gid!r}")
    found = host.get_fact(SystemAccount, account=user)
    commands = account_commands(user, uid, gid, found)
    if not commands:
        host.noop(f"account {user} ({uid}:{gid}) exists")
        return
    yield from commands
