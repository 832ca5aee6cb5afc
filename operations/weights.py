"""Weight volumes: model files staged from the bundle under one root, root-owned and read-only,
with the record the services' start-time check reads (templates/gpufleet-verify-weights)."""

import posixpath

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files

from . import bundle, config, staging

DEFAULTS = {"inference_weights_root": "/srv/gpufleet/weights"}

config.register({"inference_weights_root": (config._is_str, "an absolute path on the host")})


@deploy("Stage weight volumes", data_defaults=DEFAULTS)
def stage_volumes(bundle_path=None, weights_root=None):
    """
    Stage every weight volume of the bundle under ``weights_root`` (files 0444, owned by root).

    + bundle_path: the bundle on the control node (``gpufleet_bundle``)
    + weights_root: where volumes live on the host (``inference_weights_root``)

    Returns the staging operation of each volume, by name.
    """
    bundle_path = bundle_path or host.data.gpufleet_bundle
    weights_root = weights_root or host.data.inference_weights_root
    files.directory(name=f"Ensure {weights_root} exists", path=weights_root, mode="755", user="root", group="root")
    if not bundle_path:
        return {}
    contents = bundle.load(bundle_path)
    return {volume: staging.stage(name=f"Stage weight volume {volume}", src=f"{bundle_path}/{prefix}",
                                  dest=posixpath.join(weights_root, volume), files=bundle.part(contents, prefix),
                                  mode="444")
            for volume, prefix in sorted(contents.get("weights", {}).items())}
