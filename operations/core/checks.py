"""
Check every host's gpufleet settings before any operation runs; errors name the field.

``CHECKS`` is the whole table: every setting of group_data/all.py, the check its value must pass and
what it must be. ``CROSS_CHECKS`` lists the rules across fields, each kept with the concern whose
data it reads and run once every field passed its own check. Nothing registers at import time.
"""

import difflib
import importlib
import ipaddress
import re

from pyinfra.api.arguments import all_argument_meta
from pyinfra.api.connectors import get_all_connectors

from operations.core import settings
from operations.core.errors import ConfigError

# --- the value checks (public: concern modules check their own nested values with them) ------------

PINNED_IMAGE = re.compile(r"^[\w.\-/:]+(:[\w.\-]+|@sha256:[0-9a-f]{64})$")


def is_str(value):
    return isinstance(value, str) and value.strip() != ""


def is_str_list(value):
    return isinstance(value, (list, tuple)) and all(is_str(item) for item in value)


def is_positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_bool(value):
    return isinstance(value, bool)


def is_dict(value):
    return isinstance(value, dict)


def is_list(value):
    return isinstance(value, list)


def is_size(value):
    return isinstance(value, str) and value[:-1].isdigit() and value[-1] in "kmg"


def is_duration(value):
    """A Prometheus duration of one unit: '30d', '12w', '90m'."""
    return isinstance(value, str) and value[:-1].isdigit() and int(value[:-1]) > 0 and value[-1] in "smhdwy"


def is_absolute_path(value):
    return is_str(value) and value.startswith("/")


def is_percent(value):
    return is_positive_int(value) and value < 100


def is_url(value):
    return is_str(value) and value.startswith(("http://", "https://"))


def is_url_list(value):
    return isinstance(value, list) and all(is_url(item) for item in value)


def is_address(value):
    try:
        ipaddress.ip_address(value)
    except (TypeError, ValueError):
        return False
    return True


def is_network_list(value):
    if not isinstance(value, list):
        return False
    try:
        for source in value:
            ipaddress.ip_network(source, strict=False)
    except (TypeError, ValueError):
        return False
    return True


def is_registry_map(value):
    return isinstance(value, dict) and all(is_str(key) and is_str(item) for key, item in value.items())


def is_pinned_image(image):
    """True for an image named by a tag other than ``latest``, or by digest."""
    return (
        isinstance(image, str)
        and bool(PINNED_IMAGE.match(image))
        and not image.endswith(":latest")
        and ":" in image.rsplit("/", 1)[-1]
    )


def is_pinned_version(value):
    return isinstance(value, str) and value.count(".") == 2 and value != "latest"


def is_vmid(value):
    return str(value).isdigit() and int(value) >= 100


class OneOf:
    """A check that accepts the listed values only (group_data/all.py documents the same list)."""

    def __init__(self, *values):
        self.values = values

    def __call__(self, value):
        return value in self.values

    def __str__(self):
        return f"one of {', '.join(self.values)}"


def size_bytes(value):
    """A size such as '50m' in bytes (k, m, g: powers of 1024)."""
    return int(value[:-1]) * 1024 ** ("kmg".index(value[-1]) + 1)


# --- the accepted values of the settings that take one of a few words --------------------------

DRIVER_SOURCES = OneOf("distro", "cuda-repo", "local-repo", "bundle")
TOOLKIT_SOURCES = OneOf("nvidia-repo", "local-repo", "bundle")
CONTAINER_RUNTIMES = OneOf("docker", "containerd", "podman")
PASSTHROUGH_SYNTAXES = OneOf("auto", "dev", "lxc")
STAGE_TRANSPORTS = OneOf("openssh", "paramiko")
VECTOR_DBS = OneOf("qdrant", "chroma")

TRUE_OR_FALSE = (is_bool, "true or false")
SECONDS = (is_positive_int, "seconds, above 0")

# --- setting -> (check, what it must be): every setting of group_data/all.py -----------------

CHECKS = {
    # every host
    "gpufleet_config_dir": (is_str, "an absolute path"),
    "gpufleet_state_dir": (is_str, "an absolute path"),
    "gpufleet_offline": TRUE_OR_FALSE,
    "gpufleet_free_space_margin": (is_size, "a size such as '1g' (k, m or g)"),
    "gpufleet_other_data": (is_str_list, "a list of data keys gpufleet leaves to your own deploys"),
    "gpufleet_stage_via": (is_str, "the name of another host in the run to pull staged files from"),
    "gpufleet_stage_transport": (STAGE_TRANSPORTS, "'openssh' or 'paramiko'"),
    "gpufleet_site_address": (is_str, "the address other hosts of the site reach this one at"),
    "gpufleet_site_port": (is_positive_int, "the SSH port other hosts of the site reach this one at"),
    "gpufleet_liveness_interval": SECONDS,
    "gpufleet_liveness_timeout": SECONDS,
    "gpufleet_upgrade_batch": (is_positive_int, "a whole number above 0 (hosts upgraded at once)"),
    "gpufleet_upgrade_max_failed": (is_count, "a whole number, 0 or more (failed hosts a rollout goes on past)"),
    "gpufleet_upgrade_drain_timeout": (is_positive_int, "seconds (a whole number above 0)"),
    "gpufleet_prune": TRUE_OR_FALSE,
    # the site's TLS
    "gpufleet_tls_dir": (is_str, "a directory on the control node"),
    "gpufleet_tls_cert_file": (is_str, "a certificate file (PEM) on the control node"),
    "gpufleet_tls_key_file": (is_str, "its key file (PEM) on the control node"),
    "gpufleet_tls_ca_file": (is_str, "the CA certificate file (PEM) on the control node"),
    # container runtime (Docker)
    "docker_packages": (is_str_list, "a list of package names"),
    "docker_log_max_size": (is_size, "a size such as '50m' (k, m or g)"),
    "docker_log_max_file": (is_positive_int, "a whole number above 0"),
    "docker_daemon_settings": (is_dict, "a dict of daemon.json keys"),
    "docker_registry_mirrors": (is_url_list, "a list of mirror URLs such as 'https://mirror.example:5000'"),
    "docker_registry_ca_files": (
        is_registry_map,
        "a dict of registry ('host:port') -> CA certificate file on the control node",
    ),
    "docker_registry_logins": (
        is_registry_map,
        "a dict of registry ('host:port') -> root-only file on the control node holding USERNAME:PASSWORD",
    ),
    # NVIDIA driver
    "nvidia_driver_source": (DRIVER_SOURCES, str(DRIVER_SOURCES)),
    "nvidia_driver_version": (is_str, "a branch such as '580' or a version such as '580.173.02'"),
    "nvidia_driver_open": TRUE_OR_FALSE,
    "nvidia_driver_debian_mirror": (is_str, "a Debian mirror URL"),
    "nvidia_driver_debian_security_mirror": (is_str, "a Debian security mirror URL"),
    "nvidia_driver_cuda_repo_url": (is_str, "a URL of NVIDIA's CUDA apt repository"),
    "nvidia_driver_local_repo": (is_str, "a directory on the host holding a flat apt repository"),
    "nvidia_driver_secure_boot_signed": TRUE_OR_FALSE,
    "nvidia_driver_reboot": TRUE_OR_FALSE,
    "nvidia_driver_reboot_timeout": SECONDS,
    # NVIDIA Container Toolkit
    "nvidia_toolkit_version": (is_pinned_version, "a pinned version such as '1.17.8'"),
    "nvidia_toolkit_source": (TOOLKIT_SOURCES, str(TOOLKIT_SOURCES)),
    "nvidia_toolkit_local_repo": (is_str, "a directory on the host for a flat apt repository"),
    "nvidia_toolkit_local_repo_src": (is_str, "a directory on the control node to stage from"),
    "nvidia_toolkit_engine": (CONTAINER_RUNTIMES, str(CONTAINER_RUNTIMES)),
    "nvidia_toolkit_set_as_default": TRUE_OR_FALSE,
    "nvidia_toolkit_dev_char_symlinks": TRUE_OR_FALSE,
    "nvidia_toolkit_check_image": (is_pinned_image, "a CUDA image pinned by tag or digest (never 'latest')"),
    # offline bundle
    "gpufleet_bundle": (is_str, "a bundle directory on the control node"),
    "gpufleet_bundle_dir": (is_str, "an absolute path on the host"),
    "gpufleet_bundle_signers": (is_str, "an ssh-keygen allowed_signers file on the control node"),
    # inference services
    "inference_services": (is_list, "a list of services (see group_data/all.py)"),
    "inference_listen": (is_address, "an IP address of the host (127.0.0.1, 10.0.0.5, 0.0.0.0 for all)"),
    "inference_expose_unauthenticated": TRUE_OR_FALSE,
    "inference_allowed_sources": (
        is_network_list,
        "a list of addresses or networks ('10.0.0.0/8', '192.0.2.7', 'fd00::/8')",
    ),
    "inference_firewall": TRUE_OR_FALSE,
    "inference_start_timeout": SECONDS,
    "inference_max_request_bytes": (is_size, "a size such as '32m' (k, m or g)"),
    # the site's gateway
    "gateway_port": (is_positive_int, "a TCP port (443 by default)"),
    "gateway_listen": (is_address, "an IP address of the gateway host (0.0.0.0 for all)"),
    "gateway_check_interval": SECONDS,
    "gateway_allowed_sources": (is_network_list, "a list of addresses or networks such as ['10.0.0.0/8']"),
    # monitoring
    "monitoring_node_exporter_port": (is_positive_int, "a TCP port (9100 by default)"),
    "monitoring_gateway_metrics_port": (is_positive_int, "a TCP port (8405 by default)"),
    "monitoring_prometheus_port": (is_positive_int, "a TCP port (9090 by default)"),
    "monitoring_gpu_metrics": TRUE_OR_FALSE,
    "monitoring_dcgm_exporter_image": (is_pinned_image, "dcgm-exporter's image pinned by tag or digest"),
    "monitoring_dcgm_exporter_port": (is_positive_int, "a TCP port (9400 by default)"),
    "monitoring_scrape_interval": SECONDS,
    "monitoring_alert_after": SECONDS,
    "monitoring_retention": (is_duration, "a Prometheus duration such as '30d' or '12w'"),
    "monitoring_storage_path": (is_absolute_path, "an absolute path on the monitoring host"),
    "monitoring_weights_free_percent": (is_percent, "a whole number of percent, 1 to 99"),
    "monitoring_gpu_temperature_limit": (is_positive_int, "degrees Celsius, such as 87"),
    "inference_request_timeout": SECONDS,
    "inference_image_follow_tag": TRUE_OR_FALSE,
    # weights
    "inference_weights_root": (is_str, "an absolute path on the host"),
    "inference_weight_volumes": (
        is_dict,
        "a dict of volume name -> {'from': DIR} or {'hf': 'org/name', 'revision': COMMIT}",
    ),
    "inference_hf_endpoint": (is_url, "the hub's URL, such as 'https://huggingface.co' or a site mirror"),
    "inference_weights_follow_branch": TRUE_OR_FALSE,
    # Proxmox VE
    "proxmox_host": (is_str, "the inventory name of the guest's Proxmox VE host"),
    "proxmox_vmid": (is_vmid, "the guest's VMID, a whole number from 100"),
    "proxmox_passthrough": (PASSTHROUGH_SYNTAXES, str(PASSTHROUGH_SYNTAXES)),
    "proxmox_guest_restart": TRUE_OR_FALSE,
    "proxmox_docker_features": TRUE_OR_FALSE,
    "proxmox_kernel_headers": (is_str, "the apt package of the running Proxmox kernel's headers"),
    # the RAG stack (rag_hosts)
    "rag_webui_image": (is_pinned_image, "Open WebUI's image pinned by tag or digest"),
    "rag_port": (is_positive_int, "a TCP port (3000 by default)"),
    "rag_vector_db": (VECTOR_DBS, str(VECTOR_DBS)),
    "rag_vector_db_image": (is_pinned_image, "the vector database's image pinned by tag or digest"),
    "rag_vector_db_port": (is_positive_int, "a TCP port (6333 by default)"),
    "rag_chat_service": (is_str, "the name of one of the host's inference_services"),
    "rag_embedding_service": (is_str, "the name of one of the host's inference_services"),
    "rag_admin_email": (is_str, "the first admin's e-mail address"),
    "rag_admin_password_file": (is_str, "a file on the control node holding the first admin's password"),
    "rag_webui_settings": (is_dict, "a dict of Open WebUI variable -> value"),
    "rag_data_dir": (is_absolute_path, "an absolute path on the host"),
    "rag_start_timeout": SECONDS,
    "rag_gateway_port": (is_positive_int, "None, or the gateway's TCP port for Open WebUI (e.g. 8444)"),
    "rag_front_port": (is_positive_int, "the RAG host's TCP port for its TLS front (3443 by default)"),
}

# Rules across fields (or reading files on the control node), in the order they run: "module:function",
# each called with (data, host_name) and raising ConfigError naming the field.
CROSS_CHECKS = [
    "operations.offline.from_bundle:check_bundle",  # a signed bundle's signature; an offline host's sources
    "operations.driver.install:check_version",  # nvidia_driver_version: a branch or an exact version
    "operations.container.docker:check_registry_files",  # logins and CAs exist, logins root-only
    "operations.toolkit.install:check_runtime",  # hosts with services run Docker
    "operations.weights.volumes:check_volumes",  # each volume's source, revision and token
    "operations.services.site_tls:check_tls_files",  # the site's own certificate, key and CA together
    "operations.services.inference:check_services",  # each service: engine, args, ports, exposure, image, model
]


def cross_checks():
    """The functions ``CROSS_CHECKS`` names, imported when a run validates (not when this module loads)."""
    found = []
    for reference in CROSS_CHECKS:
        module, function = reference.split(":")
        found.append(getattr(importlib.import_module(module), function))
    return found


def pyinfra_keys():
    """The data keys pyinfra itself reads: its global arguments (``_sudo``, ...) and every connector's
    settings (``ssh_user``, ``ssh_paramiko_connect_kwargs``, ``docker_identifier``, ...)."""
    keys = set(all_argument_meta)
    for connector in get_all_connectors().values():
        keys |= set(getattr(connector, "data_meta", None) or {})
    return keys


def validate(data, host_name=None):
    """
    Raise ConfigError for the first unknown, misspelt or malformed key of a host's data. Known keys
    are gpufleet's settings (group_data/all.py), pyinfra's own, and those ``gpufleet_other_data``
    names (data your own deploys read from the same inventory).
    """
    known = pyinfra_keys() | set(data.get("gpufleet_other_data") or ())
    for key in sorted(data):
        if key in known:
            continue
        if key.startswith("_"):
            # A group_data file's private helper (pyinfra keeps `_LAB = ...` as data), unless it is
            # a misspelt pyinfra argument such as `_sudoo`.
            close = difflib.get_close_matches(key, sorted(all_argument_meta), n=1, cutoff=0.8)
            if close:
                raise ConfigError(key, f"unknown pyinfra argument (did you mean {close[0]!r}?)", host=host_name)
            continue
        if key not in CHECKS:
            close = difflib.get_close_matches(key, [*CHECKS, *known], n=1)
            hint = (
                f" (did you mean {close[0]!r}?)"
                if close
                else "; data your own deploys read goes in gpufleet_other_data"
            )
            raise ConfigError(key, f"unknown setting{hint}", host=host_name)
        check, expected = CHECKS[key]
        value = data[key]
        if value is None and settings.DEFAULTS.get(key) is not None:
            raise ConfigError(key, f"is required: must be {expected}, got None", host=host_name)
        if value is not None and not check(value):
            raise ConfigError(key, f"must be {expected}, got {value!r}", host=host_name)
    for cross_check in cross_checks():
        cross_check(data, host_name)


# Groups whose name means something to gpufleet; any other group needs a group_data file to mean anything.
GROUPS = {"all", "gpu_hosts", "proxmox_hosts", "lxc_guests", "gateway_hosts", "monitoring_hosts", "rag_hosts"}


def unknown_groups(groups, group_data=settings.GROUP_DATA_ALL.parent):
    """The groups of ``groups`` gpufleet does not know and no group_data/<group>.py file names."""
    return sorted(group for group in groups if group not in GROUPS and not (group_data / f"{group}.py").is_file())


def host_settings(host):
    """Everything a host's data holds (group data, host data, --data), gpufleet's settings over their defaults."""
    return {key: host.data.get(key) for key in host.data.dict()}
