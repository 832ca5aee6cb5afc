"""The CUDA <-> driver gate: an image whose CUDA the host's driver cannot run is a named error."""

from operations.core.errors import ConfigError

# Minimum Linux x86_64 driver per CUDA release (NVIDIA's CUDA toolkit release notes, table 3).
MIN_DRIVER = {
    "11.8": "520.61.05",
    "12.0": "525.60.13",
    "12.1": "530.30.02",
    "12.2": "535.86.10",
    "12.3": "545.23.06",
    "12.4": "550.54.14",
    "12.5": "555.42.02",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
}


def _numbers(version):
    return tuple(int(part) for part in version.split("."))


def minimum_driver(cuda):
    """The minimum driver for a CUDA version such as '12.4' or '12.4.1'."""
    release = ".".join(str(cuda).split(".")[:2])
    if release not in MIN_DRIVER:
        raise ConfigError("cuda", f"CUDA {cuda} is not in the gate's table ({', '.join(MIN_DRIVER)})")
    return MIN_DRIVER[release]


def check(cuda, driver, field="image", host_name=None):
    """Raise ConfigError naming ``field`` when ``driver`` is too old for ``cuda``."""
    needed = minimum_driver(cuda)
    if _numbers(driver) < _numbers(needed):
        raise ConfigError(
            field,
            f"needs CUDA {cuda}, which needs NVIDIA driver >= {needed}; the host's driver is {driver}",
            host=host_name,
        )
