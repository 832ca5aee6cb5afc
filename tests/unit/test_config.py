import ast
from pathlib import Path

import pytest

from operations import (base, config, docker_engine, inference, nvidia_driver, nvidia_toolkit, offline,
                        proxmox, staging, weights)
from operations.errors import ConfigError

ALL_PY = Path(__file__).resolve().parents[2] / "group_data" / "all.py"


def documented_settings():
    """gpufleet's own settings in group_data/all.py (pyinfra's ssh_ connector settings left out)."""
    tree = ast.parse(ALL_PY.read_text())
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if t.id.startswith(config.PREFIXES)}


def test_group_data_all_documents_every_default_with_the_same_value():
    documented = documented_settings()
    for module in (base, docker_engine, nvidia_driver, nvidia_toolkit, offline, inference, weights, proxmox,
                   staging):
        for key, value in module.DEFAULTS.items():
            assert documented.get(key) == value, f"group_data/all.py: {key}"


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
