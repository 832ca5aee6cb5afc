"""
gpufleet: turn the inventory's hosts into GPU inference hosts.

    pyinfra inventories/prod.py deploy.py [--dry] [--diff] [--limit HOST]

Which deploys apply is decided here from the host's groups and data; what each does is in
operations/. Settings are checked first: a bad value stops the run before any host changes.
"""

from pyinfra import host

from operations import base, config, docker_engine, nvidia_driver, nvidia_toolkit

config.validate(config.host_settings(host), host.name)

intent = {"groups": sorted(host.groups), "gpus": len(base.gpus()), "docker": False}
base.prepare()

if "gpu_hosts" in host.groups:
    nvidia_driver.install_driver()
    intent["nvidia_driver_version"] = host.data.nvidia_driver_version
    daemon_json = docker_engine.install_docker()
    nvidia_runtime = nvidia_toolkit.install_toolkit()
    docker_engine.restart_on_change([daemon_json, nvidia_runtime])
    intent["nvidia_toolkit_version"] = host.data.nvidia_toolkit_version
    intent["docker"] = True

if not intent["gpus"]:
    base.say_no_gpu(["driver module checks", "persistence daemon", "reboot", "GPU container run"])

base.record(intent)
