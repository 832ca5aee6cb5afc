import re
from pathlib import Path

import pytest

from operations import config, settings
from operations.errors import ConfigError
import operations.roles  # noqa: F401  (imports every concern module: each registers its checks)

OPERATIONS_DIR = Path(config.__file__).resolve().parent


def documented_settings():
    """gpufleet's own settings as group_data/all.py writes them (pyinfra's ssh_ settings left out)."""
    return settings.read(settings.GROUP_DATA_ALL)


def test_defaults_are_read_from_group_data_all():
    assert settings.DEFAULTS == documented_settings()
    assert settings.DEFAULTS["nvidia_driver_version"] and "ssh_paramiko_connect_kwargs" not in settings.DEFAULTS


def test_every_setting_the_code_reads_is_documented():
    read = set()
    for source in OPERATIONS_DIR.rglob("*.py"):
        read |= set(re.findall(rf"data(?:\.get\(['\"]|\.)((?:{'|'.join(settings.PREFIXES)})\w+)", source.read_text()))
    assert read, "no settings found: the pattern no longer matches the code"
    assert read <= set(settings.DEFAULTS), sorted(read - set(settings.DEFAULTS))


def test_every_documented_setting_is_checked():
    assert set(documented_settings()) <= set(config.CHECKS)


def test_documented_defaults_pass_validation():
    config.validate(documented_settings())


def test_typo_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"web1: docker_log_max_fil: unknown setting \(did you mean 'docker_log_max_file'\?\)"):
        config.validate({"docker_log_max_fil": 3}, host_name="web1")


@pytest.mark.parametrize("field, value", [
    ("docker_log_max_size", "lots"),
    ("docker_log_max_file", 0),
    ("docker_packages", "docker.io"),
    ("gpufleet_offline", "yes"),
    ("nvidia_toolkit_check_image", "nvidia/cuda:latest"),
    ("nvidia_toolkit_check_image", "nvidia/cuda"),
])
def test_malformed_value_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: must be"):
        config.validate({field: value})


def test_unrelated_data_is_left_alone():
    config.validate({"ssh_port": 22, "lab_address": "172.18.0.2"})
