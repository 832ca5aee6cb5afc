import re
from pathlib import Path

import pytest

import operations
from operations.core import checks, settings
from operations.core.errors import ConfigError
from operations.services import engines

OPERATIONS_DIR = Path(operations.__file__).resolve().parent


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
    assert set(documented_settings()) <= set(checks.CHECKS)


def test_documented_defaults_pass_validation():
    checks.validate(documented_settings())


def test_typo_is_named_with_a_suggestion():
    with pytest.raises(
        ConfigError, match=r"web1: docker_log_max_fil: unknown setting \(did you mean 'docker_log_max_file'\?\)"
    ):
        checks.validate({"docker_log_max_fil": 3}, host_name="web1")


@pytest.mark.parametrize(
    "field, value",
    [
        ("docker_log_max_size", "lots"),
        ("docker_log_max_file", 0),
        ("docker_packages", "docker.io"),
        ("gpufleet_offline", "yes"),
        ("nvidia_toolkit_check_image", "nvidia/cuda:latest"),
        ("nvidia_toolkit_check_image", "nvidia/cuda"),
    ],
)
def test_malformed_value_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: must be"):
        checks.validate({field: value})


def test_pyinfra_keys_are_known_and_a_key_nobody_knows_is_refused_whatever_its_prefix():
    checks.validate(
        {
            "ssh_port": 22,
            "ssh_user": "ops",
            "_sudo": True,
            "_sudo_password": "x",
            "ssh_paramiko_connect_kwargs": {},
            "docker_identifier": "abc",
        }
    )
    with pytest.raises(
        ConfigError, match=r"web1: infrence_services: unknown setting \(did you mean 'inference_services'\?\)"
    ):
        checks.validate({"infrence_services": []}, host_name="web1")
    with pytest.raises(
        ConfigError,
        match=r"^rack_position: unknown setting; data your own deploys read goes in "
        "gpufleet_other_data",
    ):
        checks.validate({"rack_position": "B4"})


def test_data_of_your_own_deploys_is_left_alone_once_named():
    checks.validate({"rack_position": "B4", "gpufleet_other_data": ["rack_position"]})


def test_private_helpers_of_group_data_files_pass_and_a_misspelt_pyinfra_argument_does_not():
    checks.validate({"_LAB": "/srv/lab", "_helper_path": "x"})
    with pytest.raises(ConfigError, match=r"^_sudoo: unknown pyinfra argument \(did you mean '_sudo'\?\)"):
        checks.validate({"_sudoo": True})


def test_none_is_refused_where_a_value_is_required_and_allowed_where_none_is_the_default():
    with pytest.raises(ConfigError, match=r"^nvidia_driver_version: is required"):
        checks.validate({"nvidia_driver_version": None})
    with pytest.raises(ConfigError, match=r"^inference_services: is required"):
        checks.validate({"inference_services": None})
    checks.validate({"proxmox_host": None, "gpufleet_bundle": None, "inference_hf_endpoint": None})


def test_groups_gpufleet_does_not_know_and_no_group_data_names_are_listed(tmp_path):
    (tmp_path / "airgapped.py").write_text("gpufleet_offline = True\n")
    assert checks.unknown_groups({"all", "gpu_hosts", "airgapped", "gpu_host", "rack_b"}, tmp_path) == [
        "gpu_host",
        "rack_b",
    ]
    assert checks.unknown_groups({"gpu_hosts", "lxc_guests", "proxmox_hosts", "airgapped", "lab"}) == []


def documented_group_data():
    """The group_data examples of the README and docs/ (```python blocks opening with '# group_data/'), as data."""
    repo = settings.GROUP_DATA_ALL.parent.parent
    text = "\n".join(page.read_text() for page in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))])
    blocks = re.findall(r"```python\n(# group_data/[^\n]*\n.*?)```", text, re.S)
    assert len(blocks) >= 2, "README and docs/: the group_data examples are gone"
    return [settings.read_source(block) for block in blocks]


def test_documented_group_data_examples_are_known_settings_of_the_right_type():
    for data in documented_group_data():
        assert data
        for key, value in data.items():
            assert key in checks.CHECKS, key
            check, expected = checks.CHECKS[key]
            assert check(value), f"{key}: must be {expected}, got {value!r}"
        for index, service in enumerate(data.get("inference_services", [])):
            engines.check_service(index, service)


def documented_value_sets():
    """Each setting of group_data/all.py whose comment ends with a line ``# One of: a | b | c``: its values."""
    documented, comment = {}, []
    for line in settings.GROUP_DATA_ALL.read_text().splitlines():
        if line.startswith("#"):
            comment.append(line)
            continue
        name = line.split("=", 1)[0].strip()
        if comment and comment[-1].startswith("# One of: ") and name.isidentifier():
            documented[name] = tuple(value.strip() for value in comment[-1][len("# One of: ") :].split("|"))
        comment = []
    return documented


def test_documented_value_sets_are_what_the_checks_accept():
    accepted = {name: check.values for name, (check, _) in checks.CHECKS.items() if isinstance(check, checks.OneOf)}
    assert documented_value_sets() == accepted


def test_documented_engines_are_the_engine_profiles():
    text = settings.GROUP_DATA_ALL.read_text()
    listed = re.search(r"engine \(([a-z. |]+)\)", text).group(1)
    assert tuple(value.strip() for value in listed.split("|")) == tuple(engines.ENGINES)


def test_every_cross_check_the_table_names_exists():
    assert [function.__name__ for function in checks.cross_checks()] == [
        reference.split(":")[1] for reference in checks.CROSS_CHECKS
    ]


def test_a_value_outside_a_set_is_refused_naming_the_values():
    with pytest.raises(ConfigError, match="nvidia_driver_source: must be one of distro, cuda-repo, local-repo, bundle"):
        checks.validate({"nvidia_driver_source": "ppa"})
