"""Every gpufleet host: its directories and their modes."""


def test_config_dir_is_root_owned(host):
    config_dir = host.file("/etc/gpufleet")
    assert config_dir.is_directory
    assert (config_dir.user, config_dir.group, config_dir.mode) == ("root", "root", 0o755)


def test_secrets_dir_is_root_only(host):
    secrets = host.file("/etc/gpufleet/secrets")
    assert secrets.is_directory
    assert (secrets.user, secrets.mode) == ("root", 0o700)


def test_recorded_gpu_count_matches_hardware(host, intent):
    found = host.run(
        'for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor)" = 0x10de ] && '
        "case $(cat $d/class) in 0x03*) echo $d;; esac; done; true"
    ).stdout.split()
    assert intent["gpus"] == len(found)
