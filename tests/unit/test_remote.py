"""Commands on gpufleet's own channels get the operation's privilege wrapper, as pyinfra's do."""

from types import SimpleNamespace

import pytest
from pyinfra.api import Config

from operations.core import remote
from operations.core.errors import ConfigError


def shell(**arguments):
    state = SimpleNamespace(config=Config())
    host = SimpleNamespace(name="gpu1", connector_data={})
    return remote.Shell(state, host, arguments)


def test_no_privilege_arguments_run_the_command_as_is_in_sh():
    assert shell().wrap("cat > /x") == "sh -c 'cat > /x'"


def test_sudo_login_wraps_in_sudo_without_a_prompt():
    assert shell(_sudo=True).wrap("cat > /x") == "sudo -H -n sh -c 'cat > /x'"
    assert shell(_sudo=True, _sudo_user="svc").wrap("id -u") == "sudo -H -n -u svc sh -c 'id -u'"


def test_run_only_arguments_stay_out_of_the_command_line():
    assert shell(_sudo=True, _timeout=5, _get_pty=False, _retries=2).wrap("true") == "sudo -H -n sh -c true"


def test_login_drops_the_wrapper():
    assert shell(_sudo=True).login().wrap("cat >> ~/.ssh/authorized_keys") == "sh -c 'cat >> ~/.ssh/authorized_keys'"


def test_written_file_is_private_from_its_first_byte_and_moved_into_place():
    assert remote.write_file_command("/etc/gpufleet/secrets/a b.env") == (
        "umask 077 && cat > '/etc/gpufleet/secrets/a b.env.gpufleet-new' && "
        "chmod 600 '/etc/gpufleet/secrets/a b.env.gpufleet-new' && "
        "chown root:root '/etc/gpufleet/secrets/a b.env.gpufleet-new' && "
        "mv -f '/etc/gpufleet/secrets/a b.env.gpufleet-new' '/etc/gpufleet/secrets/a b.env'"
    )


def test_login_privilege_fact_reads_root_and_sudo_users():
    fact = remote.LoginPrivilege()
    assert fact.process(["uid=0 user=root", "sudo_rc=0"]) == {
        "uid": 0,
        "user": "root",
        "sudo_ok": True,
        "sudo_message": "exit 0",
    }
    assert fact.process(["uid=1001 user=ops", "sudo: a password is required", "sudo_rc=1"]) == {
        "uid": 1001,
        "user": "ops",
        "sudo_ok": False,
        "sudo_message": "sudo: a password is required",
    }


class FactHost:
    def __init__(self, login, became=0, **data):
        self.name, self.login, self.became = "gpu1", login, became
        self.data = SimpleNamespace(**data)
        self.state = SimpleNamespace(config=Config())
        self.current_deploy_kwargs = None

    def get_fact(self, cls, **kwargs):
        return self.login if cls is remote.LoginPrivilege else self.became


ROOT = {"uid": 0, "user": "root", "sudo_ok": True, "sudo_message": "exit 0"}
OPS = {"uid": 1000, "user": "ops", "sudo_ok": True, "sudo_message": "exit 0"}
OPS_NO_SUDO = {**OPS, "sudo_ok": False, "sudo_message": "sudo: a password is required"}


def test_root_login_needs_no_wrapper():
    remote.require_root(FactHost(ROOT))


def test_sudo_user_with_passwordless_sudo_is_accepted():
    remote.require_root(FactHost(OPS, _sudo=True))


def test_non_root_login_without_a_wrapper_is_refused():
    with pytest.raises(ConfigError, match=r"^gpu1: _sudo: logs in as ops \(uid 1000\), not root, and no privilege"):
        remote.require_root(FactHost(OPS))


def test_sudo_that_asks_for_a_password_is_refused_naming_what_was_tried():
    with pytest.raises(
        ConfigError,
        match=r"tried `sudo -n true`: sudo: a password is required\. Give ops "
        r"passwordless sudo, or set `_sudo_password`",
    ):
        remote.require_root(FactHost(OPS_NO_SUDO, _sudo=True))


def test_sudo_password_is_checked_through_the_wrapper_and_never_shown():
    remote.require_root(FactHost(OPS_NO_SUDO, became=0, _sudo=True, _sudo_password="s3cret"))
    with pytest.raises(ConfigError) as refused:
        remote.require_root(FactHost(OPS_NO_SUDO, became=None, _sudo=True, _sudo_password="s3cret"))
    assert "it did not run as root (failed)" in str(refused.value) and "s3cret" not in str(refused.value)
