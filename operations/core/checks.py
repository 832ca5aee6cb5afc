"""Check every host's gpufleet settings before any operation runs; errors name the field."""

import difflib

from pyinfra.api.arguments import all_argument_meta
from pyinfra.api.connectors import get_all_connectors

from operations.core import settings
from operations.core.errors import ConfigError


def _is_str(value):
    return isinstance(value, str) and value.strip() != ""


def _is_str_list(value):
    return isinstance(value, (list, tuple)) and all(_is_str(item) for item in value)


def _is_positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_bool(value):
    return isinstance(value, bool)


def _is_dict(value):
    return isinstance(value, dict)


def _is_size(value):
    return isinstance(value, str) and value[:-1].isdigit() and value[-1] in "kmg"


def size_bytes(value):
    """A size such as '50m' in bytes (k, m, g: powers of 1024)."""
    return int(value[:-1]) * 1024 ** ("kmg".index(value[-1]) + 1)


# field: (check, what it must be). Every setting of group_data/all.py (settings.DEFAULTS) appears here.
CHECKS = {
    "gpufleet_config_dir": (_is_str, "an absolute path"),
    "gpufleet_state_dir": (_is_str, "an absolute path"),
    "gpufleet_offline": (_is_bool, "true or false"),
    "gpufleet_free_space_margin": (_is_size, "a size such as '1g' (k, m or g)"),
    "gpufleet_other_data": (_is_str_list, "a list of data keys gpufleet leaves to your own deploys"),
    "docker_packages": (_is_str_list, "a list of package names"),
    "docker_log_max_size": (_is_size, "a size such as '50m' (k, m or g)"),
    "docker_log_max_file": (_is_positive_int, "a whole number above 0"),
    "docker_daemon_settings": (_is_dict, "a dict of daemon.json keys"),
}

# Checks whose rule depends on more than one field register here (see driver, toolkit).
CROSS_CHECKS = []


def register(checks, cross_check=None):
    """Let a concern module add its fields (and one rule across fields)."""
    CHECKS.update(checks)
    if cross_check:
        CROSS_CHECKS.append(cross_check)


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
            hint = (f" (did you mean {close[0]!r}?)" if close
                    else "; data your own deploys read goes in gpufleet_other_data")
            raise ConfigError(key, f"unknown setting{hint}", host=host_name)
        check, expected = CHECKS[key]
        value = data[key]
        if value is None and settings.DEFAULTS.get(key) is not None:
            raise ConfigError(key, f"is required: must be {expected}, got None", host=host_name)
        if value is not None and not check(value):
            raise ConfigError(key, f"must be {expected}, got {value!r}", host=host_name)
    for cross_check in CROSS_CHECKS:
        cross_check(data, host_name)


# Groups whose name means something to gpufleet; any other group needs a group_data file to mean anything.
GROUPS = {"all", "gpu_hosts", "proxmox_hosts", "lxc_guests"}


def unknown_groups(groups, group_data=settings.GROUP_DATA_ALL.parent):
    """The groups of ``groups`` gpufleet does not know and no group_data/<group>.py file names."""
    return sorted(group for group in groups if group not in GROUPS and not (group_data / f"{group}.py").is_file())


def host_settings(host):
    """Everything a host's data holds (group data, host data, --data), gpufleet's settings over their defaults."""
    return {key: host.data.get(key) for key in host.data.dict()}
