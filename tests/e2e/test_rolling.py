"""
Settings changes on a serving fleet (deploy.py over lab-1 and lab-2, each serving llama.cpp on its
lab address) while a bounded probe loop on the control node sends completions to both: a Docker
log-rotation change restarts dockerd and no container (live-restore, and the unit's main process
follows its container through it); a toolkit runtime entry removed by hand comes back with a reload;
a change to the service's unit, and one to its image, restart the services one host at a time, each
answering before the next goes; with live-restore off, dockerd's restart rolls the same way. Every run ends with every service answering, and a re-run changes nothing. The windows
each host was out of service are written to .lab/measurements/rolling.json.
"""

import json

import pytest

from group_data.lab import inference_services as LAB_SERVICES
from tests.lab import hosts as lab_hosts
from tests.lab import probe

from .conftest import REPO, measurements, run_deploy

HOSTS = ("lab-1", "lab-2")
KEY = REPO / ".lab" / "secrets" / "chat-api-key"
ROLLED = "gpufleet-lab/llama-server:rolled"  # the service's image, committed again: same program, new ID
DOCKER_RESTART = (
    "GPU host | Apply Docker configuration | Restart Docker if a key it reads only at start changed (log options); "
    "containers keep running"
)
DOCKER_RELOAD = (
    "GPU host | Apply Docker configuration | Reload Docker if its configuration changed in keys it reloads "
    "(runtimes, mirrors, live-restore)"
)
SERVICE_RESTART = (
    "Service restarts, host by host | Restart gpufleet-chat after its unit, secrets, weights or image changed, "
    "or it was not ready"
)


def sh(name, command):
    return lab_hosts.ssh({"name": name}, command, check=False).stdout.strip()


def container(name):
    """The service's container: its ID and when it started."""
    return sh(name, "docker inspect -f '{{.Id}} {{.State.StartedAt}}' gpufleet-chat")


def docker_started(name):
    return sh(name, "systemctl show -p ActiveEnterTimestampMonotonic --value docker")


@pytest.fixture(scope="module")
def fleet(second_deploy, lab):
    """lab-1 and lab-2 serving on their lab address, admitted from the lab's networks; returns a
    function running deploy.py on the two with more settings. Put back as they were at the end."""
    networks = sorted({".".join(lab[name]["address"].split(".")[:2]) + ".0.0/16" for name in HOSTS})
    common = ["--data", "inference_listen=0.0.0.0", "--data", f"inference_allowed_sources={json.dumps(networks)}"]
    common += [arg for name in HOSTS for arg in ("--limit", name)]

    def deploy(*settings):
        return run_deploy(*common, *(arg for setting in settings for arg in ("--data", setting)))

    listening = deploy()
    assert listening.rc == 0, listening.output[-3000:]
    yield deploy
    back = run_deploy(*(arg for name in HOSTS for arg in ("--limit", name)))
    assert back.rc == 0, back.output[-3000:]


@pytest.fixture(scope="module")
def measured():
    yield from measurements("rolling")


def probed(lab, run, change, measured):
    """``run()`` while the probe loop sends completions to both hosts; returns its result and the rounds,
    and records the longest out-of-service window and the fewest hosts answering for ``change``."""
    targets = {name: f"http://{lab[name]['address']}:8080" for name in HOSTS}
    prober = probe.Prober(targets, KEY.read_text().strip(), interval=0.25, limit_s=600, timeout=10)
    prober.start()
    try:
        result = run()
    finally:
        rounds = prober.stop()
    longest, host = probe.longest_window(rounds)
    measured[change] = {
        "rounds": len(rounds),
        "fewest_hosts_answering": probe.fewest_answering(rounds),
        "longest_out_of_service_s": round(longest, 2),
        "longest_out_of_service_host": host,
        "out_of_service": {
            name: [[round(a, 2), round(b, 2)] for a, b in spans] for name, spans in probe.out_of_service(rounds).items()
        },
    }
    assert rounds and all(rounds[-1][1].values()), rounds[-3:]  # both answer when the run is over
    return result, rounds


def test_a_log_rotation_change_restarts_docker_and_no_container(fleet, lab, measured):
    before = {name: (container(name), docker_started(name)) for name in HOSTS}
    result, rounds = probed(lab, lambda: fleet("docker_log_max_size=20m"), "docker_log_max_size", measured)
    assert result.rc == 0, result.output[-3000:]
    assert result.changed()[DOCKER_RESTART][1] == 2, result.changed()
    assert SERVICE_RESTART not in result.changed()
    for name in HOSTS:
        assert docker_started(name) != before[name][1]  # dockerd restarted...
        assert container(name) == before[name][0]  # ...and the container is the one that ran before
        assert '"max-size": "20m"' in sh(name, "cat /etc/docker/daemon.json")
    assert probe.fewest_answering(rounds) == 2, probe.out_of_service(rounds)  # no request failed
    again = fleet("docker_log_max_size=20m")
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_a_removed_runtime_entry_comes_back_with_a_reload_and_no_restart(fleet, lab, measured):
    for name in HOSTS:  # an edit by hand: dockerd runs on, with the entry it loaded
        sh(
            name,
            "python3 -c \"import json; p='/etc/docker/daemon.json'; d=json.load(open(p)); d.pop('runtimes'); "
            "json.dump(d, open(p, 'w'))\"",
        )
    before = {name: (container(name), docker_started(name)) for name in HOSTS}
    result, rounds = probed(lab, lambda: fleet("docker_log_max_size=20m"), "runtime entry", measured)
    assert result.rc == 0, result.output[-3000:]
    assert result.changed()[DOCKER_RELOAD][1] == 2, result.changed()
    assert DOCKER_RESTART not in result.changed()
    for name in HOSTS:
        assert (container(name), docker_started(name)) == before[name]
        assert "nvidia" in sh(name, "docker info --format '{{json .Runtimes}}'")  # dockerd reloaded it
    assert probe.fewest_answering(rounds) == 2, probe.out_of_service(rounds)


def test_a_unit_change_restarts_the_services_one_host_at_a_time(fleet, lab, measured):
    before = {name: container(name) for name in HOSTS}
    result, rounds = probed(
        lab, lambda: fleet("docker_log_max_size=20m", "inference_start_timeout=301"), "service unit", measured
    )
    assert result.rc == 0, result.output[-3000:]
    # one restart per batch (pyinfra's table shows the two operations of one name as one row)
    assert result.output.count(f"--> Starting operation: {SERVICE_RESTART}") == 2, result.output[-3000:]
    assert "Service restarts, batch 2 of 2: go on unless too many hosts failed" in result.output
    after = {name: container(name) for name in HOSTS}
    assert all(after[name] != before[name] for name in HOSTS)  # each restarted, lab-1 first...
    assert after["lab-1"].split()[1] < after["lab-2"].split()[1], after
    assert probe.fewest_answering(rounds) >= 1, rounds  # ...never both at once
    windows = probe.out_of_service(rounds)
    assert not any(
        a_start < b_end and b_start < a_end
        for a_start, a_end in windows["lab-1"]
        for b_start, b_end in windows["lab-2"]
    ), windows
    again = fleet("docker_log_max_size=20m", "inference_start_timeout=301")
    assert again.rc == 0 and again.total_changed() == 0, again.changed()


def test_with_live_restore_off_a_docker_restart_waits_for_each_hosts_batch(fleet, lab, measured):
    """docker_daemon_settings turns live-restore off (a reload: nothing restarts); a log change then
    restarts dockerd, which stops the containers, so it goes host by host with the services. Turning
    it on again with a log change: a reload first, so the restart stops nothing."""
    steady = ("docker_log_max_size=20m", "inference_start_timeout=301")
    off = 'docker_daemon_settings={"live-restore": false}'
    before = {name: container(name) for name in HOSTS}
    turned_off = fleet(*steady, off)
    assert turned_off.rc == 0, turned_off.output[-3000:]
    assert {name: container(name) for name in HOSTS} == before
    try:
        result, rounds = probed(
            lab,
            lambda: fleet("docker_log_max_size=30m", steady[1], off),
            "docker_log_max_size, live-restore off",
            measured,
        )
        assert result.rc == 0, result.output[-3000:]
        assert "live-restore is off (docker_daemon_settings): restarting Docker stops the containers" in result.output
        restart = (
            "--> Starting operation: Service restarts, host by host | Restart Docker if a key it reads only at start "
            "changed (log options); live-restore off: it stops the containers"
        )
        assert result.output.count(restart) == 2, result.output[-3000:]
        after = {name: container(name) for name in HOSTS}
        assert all(after[name] != before[name] for name in HOSTS)  # the containers did stop, lab-1 first
        assert after["lab-1"].split()[1] < after["lab-2"].split()[1], after
        assert probe.fewest_answering(rounds) >= 1, rounds
    finally:
        # live-restore on and the log size back: a reload turns live-restore on, then the restart keeps them
        back = fleet(*steady)
        assert back.rc == 0, back.output[-3000:]
    assert back.changed()[DOCKER_RELOAD][1] == 2 and back.changed()[DOCKER_RESTART][1] == 2, back.changed()
    assert {name: container(name) for name in HOSTS} == after


def test_an_image_change_restarts_the_services_one_host_at_a_time(fleet, lab, measured):
    """The service moves to another image (``docker commit`` of its container on each host: the same
    program under a new image ID, which no registry serves, so the host keeps it): its containers are
    replaced on the new image, lab-1's then lab-2's, never both out at once."""
    steady = ("docker_log_max_size=20m", "inference_start_timeout=301")
    for name in HOSTS:
        assert sh(name, f"docker commit gpufleet-chat {ROLLED} >/dev/null && echo made") == "made"
    services = json.dumps([{**LAB_SERVICES[0], "image": ROLLED}])
    before = {name: container(name) for name in HOSTS}
    result, rounds = probed(lab, lambda: fleet(*steady, f"inference_services={services}"), "image", measured)
    assert result.rc == 0, result.output[-3000:]
    assert result.output.count(f"--> Starting operation: {SERVICE_RESTART}") == 2, result.output[-3000:]
    after = {name: container(name) for name in HOSTS}
    assert all(after[name] != before[name] for name in HOSTS), after
    assert after["lab-1"].split()[1] < after["lab-2"].split()[1], after
    for name in HOSTS:
        assert sh(name, "docker inspect -f '{{.Image}}' gpufleet-chat") == sh(
            name, f"docker image inspect -f '{{{{.Id}}}}' {ROLLED}"
        )
    assert probe.fewest_answering(rounds) >= 1, rounds
    windows = probe.out_of_service(rounds)
    assert not any(
        a_start < b_end and b_start < a_end
        for a_start, a_end in windows["lab-1"]
        for b_start, b_end in windows["lab-2"]
    ), windows
    again = fleet(*steady, f"inference_services={services}")
    assert again.rc == 0 and again.total_changed() == 0, again.changed()
