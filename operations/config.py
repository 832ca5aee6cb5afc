"""Check every host's gpufleet settings before any operation runs; errors name the field."""

import difflib

from .errors import ConfigError
from .settings import PREFIXES


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


# field: (check, what it must be). Every setting of group_data/all.py (settings.DEFAULTS) appears here.
CHECKS = {
    "gpufleet_config_dir": (_is_str, "an absolute path"),
    "gpufleet_state_dir": (_is_str, "an absolute path"),
    "gpufleet_offline": (_is_bool, "true or false"),
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


def validate(data, host_name=None):
    """Raise ConfigError for the first unknown, misspelt or malformed gpufleet setting."""
    for key in sorted(data):
        if not key.startswith(PREFIXES):
            continue
        if key not in CHECKS:
            close = difflib.get_close_matches(key, CHECKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key, f"unknown setting{hint}", host=host_name)
        check, expected = CHECKS[key]
        value = data[key]
        if value is not None and not check(value):
            raise ConfigError(key, f"must be {expected}, got {value!r}", host=host_name)
    for cross_check in CROSS_CHECKS:
        cross_check(data, host_name)


def host_settings(host):
    """The gpufleet settings a host sees: group and host data over each module's defaults."""
    return {key: host.data.get(key) for key in host.data.dict() if key.startswith(PREFIXES)}
