"""
gpufleet: turn the inventory's hosts into GPU inference hosts.

    pyinfra inventories/prod.py deploy.py [--dry] [--diff] [--limit HOST]

Which deploys apply is decided here from the host's groups and data; what each does is in
operations/. Settings (and the offline bundle, when one is named) are checked first: a bad value
stops the run before any host changes.
"""

from pyinfra import host

from operations import base, config, docker_engine, inference, nvidia_driver, nvidia_toolkit, offline

config.validate(config.host_settings(host), host.name)

intent = {"groups": sorted(host.groups), "gpus": len(base.gpus()), "docker": False, "services": []}
base.prepare()
if host.data.get("gpufleet_bundle"):
    offline.stage_packages()

image_ops = []
if "gpu_hosts" in host.groups:
    nvidia_driver.install_driver()
    intent["nvidia_driver_version"] = host.data.nvidia_driver_version
    daemon_json = docker_engine.install_docker()
    nvidia_runtime = nvidia_toolkit.install_toolkit()
    docker_engine.restart_on_change([daemon_json, nvidia_runtime])
    intent["nvidia_toolkit_version"] = host.data.nvidia_toolkit_version
    intent["docker"] = True
    if host.data.get("gpufleet_bundle"):
        image_ops = offline.load_images()
    results = inference.install_services(gpus=intent["gpus"], image_ops=image_ops)
    inference.summary(results)
    intent["services"] = [inference.intent(service, ready is not None) for service, ready in results]

if not intent["gpus"]:
    base.say_no_gpu(["driver module checks", "persistence daemon", "reboot", "GPU container run",
                     "GPU-only inference services"])

base.record(intent)
