"""containerd as the GPU hosts' engine (Kubernetes nodes, nerdctl): the distro package, its CRI
runtimes read from config.toml and conf.d drop-ins, the service restarted only on a change."""

import tomllib

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import apt, systemd
from pyinfra.operations.util import any_changed

CONFIG = "/etc/containerd/config.toml"
DROP_IN_DIR = "/etc/containerd/conf.d"
CRI_PLUGINS = ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime")  # config version 2, 3
FILE_MARK = "--gpufleet-file "


class ContainerdRuntimes(FactBase):
    """
    Returns the CRI plugin's runtimes (name -> BinaryName) and default runtime, across config.toml
    and the conf.d drop-ins; ``{"__invalid__": reason}`` when a file is not valid TOML.

    .. code:: python

        {"runtimes": {"runc": "", "nvidia": "/usr/bin/nvidia-container-runtime"}, "default": "runc"}
    """

    def command(self):
        return f'for f in {CONFIG} {DROP_IN_DIR}/*.toml; do [ -f "$f" ] && echo "{FILE_MARK}$f" && cat "$f"; done; true'

    def process(self, output):
        texts, path = {}, None
        for line in output:
            if line.startswith(FILE_MARK):
                path = line[len(FILE_MARK) :]
                texts[path] = []
            elif path:
                texts[path].append(line)
        found = {"runtimes": {}, "default": None}
        for path, lines in texts.items():
            try:
                config = tomllib.loads("\n".join(lines))
            except tomllib.TOMLDecodeError as error:
                return {"__invalid__": f"{path}: not valid TOML ({error})"}
            for plugin in CRI_PLUGINS:
                cri = config.get("plugins", {}).get(plugin, {}).get("containerd", {})
                for name, runtime in cri.get("runtimes", {}).items():
                    found["runtimes"][name] = runtime.get("options", {}).get("BinaryName", "")
                found["default"] = cri.get("default_runtime_name", found["default"])
        return found


@deploy("Install containerd")
def install_containerd():
    """Install containerd from the distro (an offline host: from the staged repository only)."""
    apt.packages(
        name="Install containerd",
        packages=["containerd"],
        no_recommends=True,
        update=not host.data.get("gpufleet_offline"),
        cache_time=3600,
    )


@deploy("Apply containerd configuration")
def restart_on_change(config_ops: list[OperationMeta]):
    """
    Keep containerd enabled and running, restarting it only when one of ``config_ops`` changed.

    + config_ops: operations that write containerd's configuration (the nvidia runtime)

    Returns ``[the restart]`` (a handler: it runs only after a change).
    """
    restart = systemd.service(
        name="Restart containerd if its configuration changed",
        service="containerd",
        restarted=True,
        _if=any_changed(*config_ops),
    )
    systemd.service(name="Keep containerd enabled and running", service="containerd", running=True, enabled=True)
    return [restart]
