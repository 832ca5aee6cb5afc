"""What every gpufleet host gets: its directories, and a plain statement of its GPUs."""

import posixpath
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.operations import files

from operations.core import json_files, settings


def secrets_dir(config_dir=None):
    """The root-only directory (0700) of the host's secret files: ``<gpufleet_config_dir>/secrets``."""
    return posixpath.join(config_dir or host.data.gpufleet_config_dir, "secrets")


def say_no_gpu(skipped):
    """Tell the operator plainly that GPU-only steps were skipped on this host."""
    logger.warning(
        f"[{host.name}] no NVIDIA GPU on this host (no PCI device of vendor 0x10de): skipped {', '.join(skipped)}"
    )


@deploy("Prepare gpufleet host", data_defaults=settings.DEFAULTS)
def prepare(config_dir: str | None = None, state_dir: str | None = None):
    """
    Create gpufleet's configuration (root-only secrets within) and state directories.

    + config_dir: where gpufleet keeps host configuration (``gpufleet_config_dir``)
    + state_dir: where gpufleet keeps staged files and markers (``gpufleet_state_dir``)
    """
    config_dir = config_dir or host.data.gpufleet_config_dir
    state_dir = state_dir or host.data.gpufleet_state_dir
    files.directory(name=f"Ensure {config_dir} exists", path=config_dir, mode="755", user="root", group="root")
    files.directory(
        name=f"Ensure {config_dir}/secrets is root-only",
        path=secrets_dir(config_dir),
        mode="700",
        user="root",
        group="root",
    )
    files.directory(name=f"Ensure {state_dir} exists", path=state_dir, mode="755", user="root", group="root")


@deploy("Record what gpufleet deployed")
def record(intent: dict, config_dir: str | None = None):
    """
    Write what this host is meant to be to <config_dir>/host.json, for the checks to compare with.

    + intent: dict such as ``{"groups": [...], "docker": True, "gpus": 0}``
    """
    config_dir = config_dir or host.data.gpufleet_config_dir
    files.put(
        name=f"Write {config_dir}/host.json",
        src=StringIO(json_files.render(intent)),
        dest=f"{config_dir}/host.json",
        mode="644",
        user="root",
        group="root",
    )
