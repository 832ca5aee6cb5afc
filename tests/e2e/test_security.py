"""Read as an attacker with an ordinary login on a lab host (the lab user ``nosudo``: no sudo, not in
the docker group) and as another host of the network: no secret is readable, no service answers
from elsewhere, a request without the key is refused."""

import json

import pytest

from tests.lab import hosts as lab_hosts

from .conftest import REPO

KEY = REPO / ".lab" / "secrets" / "chat-api-key"
HOSTS = ["lab-1", "lab-gap-1"]


def as_user(name, command):
    return lab_hosts.ssh({"name": name}, command, check=False, user=lab_hosts.NO_SUDO_USER)


def as_root(name, command):
    return lab_hosts.ssh({"name": name}, command, check=False)


@pytest.mark.parametrize("name", HOSTS)
def test_an_ordinary_login_reads_no_secret_file(second_deploy, name):
    listing = as_user(name, "id -Gn; ls /etc/gpufleet/secrets; cat /etc/gpufleet/secrets/chat.key")
    assert "docker" not in listing.stdout.split("\n")[0].split()
    assert "Permission denied" in listing.stderr and KEY.read_text().strip() not in listing.stdout


@pytest.mark.parametrize("name", HOSTS)
def test_an_ordinary_login_cannot_read_the_services_environment_or_ask_docker(second_deploy, name):
    pid = as_root(name, "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = llama-server ] && "
                        "echo ${p#/proc/} && break; done").stdout.strip()
    assert pid, "the llama.cpp service is not running"
    environ = as_user(name, f"cat /proc/{pid}/environ")
    assert environ.returncode != 0 and "Permission denied" in environ.stderr
    inspect = as_user(name, "docker inspect gpufleet-chat")
    assert inspect.returncode != 0 and "permission denied" in inspect.stderr.lower()
    # The container runs as the service's own account, not the login's and not root.
    owner = as_user(name, f"stat -c %U /proc/{pid}").stdout.strip()
    assert owner == "gpufleet-chat"


@pytest.mark.parametrize("name", HOSTS)
def test_no_process_environment_holds_the_key(second_deploy, name):
    """llama.cpp reads its key from its file: no process on the host has it in its environment."""
    key = KEY.read_text().strip()
    counted = lab_hosts.ssh({"name": name}, "umask 077; p=$(mktemp); cat > $p; n=0; "
                                               "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f 2>/dev/null "
                                               "| grep -F -q -f $p && n=$((n+1)); done; echo $n; rm -f $p",
                            check=False, input=key + "\n")
    assert counted.stdout.strip() == "0", counted.stderr


@pytest.mark.parametrize("name", HOSTS)
def test_a_request_without_the_key_is_refused(second_deploy, name):
    answer = as_user(name, "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/v1/models")
    assert answer.stdout == "401"
    wrong = as_user(name, "curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer not-the-key' "
                          "http://127.0.0.1:8080/v1/models")
    assert wrong.stdout == "401"


def test_no_service_port_answers_from_another_host(second_deploy, lab):
    """Every service port of lab-1 (from its host.json), probed from lab-2: nothing connects."""
    record = json.loads(as_root("lab-1", "cat /etc/gpufleet/host.json").stdout)
    address = lab["lab-1"]["address"]
    for service in record["services"]:
        probe = as_root("lab-2", f"curl -s -o /dev/null -m 5 http://{address}:{service['port']}/; echo $?")
        assert probe.stdout.strip() == "7", (service["name"], probe.stdout)  # 7: could not connect
