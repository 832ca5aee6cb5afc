import pytest

from operations.core.errors import ConfigError
from operations.driver import cuda_gate


@pytest.mark.parametrize(
    "cuda, driver",
    [
        ("12.2", "535.261.03"),
        ("12.2.2", "535.86.10"),
        ("12.0", "525.60.13"),
        ("13.0", "580.159.04"),
    ],
)
def test_driver_new_enough_passes(cuda, driver):
    cuda_gate.check(cuda, driver)


def test_driver_too_old_is_named():
    with pytest.raises(
        ConfigError,
        match=r"lab-1: services\[0\].image: needs CUDA 12.4.1, which needs NVIDIA "
        r"driver >= 550.54.14; the host's driver is 535.261.03",
    ):
        cuda_gate.check("12.4.1", "535.261.03", field="services[0].image", host_name="lab-1")


def test_versions_compare_numerically_not_as_text():
    with pytest.raises(ConfigError):
        cuda_gate.check("12.2", "535.9.1")  # 535.9 < 535.86


def test_unknown_cuda_release_is_refused():
    with pytest.raises(ConfigError, match="CUDA 10.2 is not in the gate's table"):
        cuda_gate.check("10.2", "535.261.03")
