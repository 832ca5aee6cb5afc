"""
The RAG stack's parts on a host, as pure data and functions (unit-tested): the vector database's and
Open WebUI's ``docker run`` arguments and units, Open WebUI's settings, and the check of the
inventory's ``rag_`` settings for a host of ``rag_hosts``.
"""

import posixpath
import re
from pathlib import Path

from jinja2 import Template

from operations import TEMPLATES, TOOLS_DIR
from operations.core import systemd_syntax
from operations.core.errors import ConfigError
from operations.offline import from_bundle as offline
from operations.services import auth_proxy, engines
from operations.services.names import unit_name

WEBUI, VECTOR_DB = "rag-webui", "rag-vectordb"  # their units, containers and accounts: gpufleet-NAME
# Where Open WebUI's image keeps its data, and where its start.sh reads the secret key from (its
# working directory, /app/backend: ghcr.io/open-webui/open-webui's Dockerfile and backend/start.sh).
WEBUI_DATA = "/app/backend/data"
WEBUI_SECRET_KEY_FILE = "/app/backend/.webui_secret_key"
KEY_MOUNT = "/run/secrets/gpufleet-{use}-key"
VECTOR_DBS = {
    # Qdrant's image: configuration by QDRANT__SECTION__KEY variables (config/config.yaml's keys), its
    # storage in /qdrant/storage, /readyz once ready. Not run here (no Qdrant server for this
    # machine): unverified, and run without --read-only (its image writes beside its binary at start).
    "qdrant": {
        "data_mount": "/qdrant/storage",
        "ready": "/readyz",
        "read_only": False,
        "env": lambda port: {
            "QDRANT__SERVICE__HOST": "127.0.0.1",
            "QDRANT__SERVICE__HTTP_PORT": str(port),
            "QDRANT__STORAGE__SNAPSHOTS_PATH": "/qdrant/storage/snapshots",
            "QDRANT__TELEMETRY_DISABLED": "true",
        },
        "command": lambda port: [],
        "webui": lambda port: {"VECTOR_DB": "qdrant", "QDRANT_URI": f"http://127.0.0.1:{port}"},
    },
    # Chroma's server (`chroma run`, chromadb 1.5.9): its heartbeat once ready; run in the lab.
    "chroma": {
        "data_mount": "/data",
        "ready": "/api/v2/heartbeat",
        "read_only": True,
        "env": lambda port: {"ANONYMIZED_TELEMETRY": "false"},
        "command": lambda port: ["run", "--path", "/data", "--host", "127.0.0.1", "--port", str(port)],
        "webui": lambda port: {"VECTOR_DB": "chroma", "CHROMA_HTTP_HOST": "127.0.0.1", "CHROMA_HTTP_PORT": str(port)},
    },
}
# Open WebUI's variables gpufleet sets itself (refused in rag_webui_settings, naming the setting).
MANAGED = {
    "PORT": "rag_port",
    "HOST": "rag_port",
    "DATA_DIR": "rag_data_dir",
    "VECTOR_DB": "rag_vector_db",
    "QDRANT_URI": "rag_vector_db_port",
    "CHROMA_HTTP_HOST": "rag_vector_db_port",
    "CHROMA_HTTP_PORT": "rag_vector_db_port",
    "OPENAI_API_BASE_URL": "rag_chat_service",
    "OPENAI_API_KEY": "rag_chat_service",
    "RAG_OPENAI_API_BASE_URL": "rag_embedding_service",
    "RAG_OPENAI_API_KEY": "rag_embedding_service",
    "RAG_EMBEDDING_ENGINE": "rag_embedding_service",
    "RAG_EMBEDDING_MODEL": "rag_embedding_service",
    "WEBUI_SECRET_KEY": None,
    "ENABLE_PERSISTENT_CONFIG": None,
    "OFFLINE_MODE": None,
    "STATIC_DIR": None,
    "WEBUI_ADMIN_EMAIL": "rag_admin_email",
    "WEBUI_ADMIN_PASSWORD": "rag_admin_password_file",
}
# What gpufleet sets for every stack (each overridable in rag_webui_settings but for the managed ones):
# sign-up off (the deploy creates the first admin), nothing fetched or reported (OFFLINE_MODE: no
# update check, no model download; its embeddings come from the fleet), no Ollama connection unless
# asked for.
DEFAULT_SETTINGS = {
    "ENABLE_SIGNUP": "false",
    "ENABLE_OLLAMA_API": "false",
    "HF_HUB_OFFLINE": "1",
    "SCARF_NO_ANALYTICS": "true",
    "DO_NOT_TRACK": "true",
    "ANONYMIZED_TELEMETRY": "false",
}
SECRET_WORDS = ("KEY", "SECRET", "PASSWORD", "TOKEN")
SETTING = re.compile(r"[A-Z][A-Z0-9_]*")


def _service(data, field, host_name):
    """The host's inference service that ``field`` names."""
    name = data.get(field)
    if not name:
        raise ConfigError(
            field, "is required on a host of rag_hosts: the name of one of its inference_services", host=host_name
        )
    for service in data.get("inference_services") or []:
        if isinstance(service, dict) and service.get("name") == name:
            return service
    raise ConfigError(field, f"{name!r} is not one of this host's inference_services", host=host_name)


def check_stack(data, host_name=None, groups=("gpu_hosts", "rag_hosts"), gateways=()):
    """Raise ConfigError naming the ``rag_`` setting at fault, for a host of ``rag_hosts`` (in ``groups``)
    of an inventory whose ``gateway_hosts`` are ``gateways``."""
    if "gpu_hosts" not in groups:
        raise ConfigError(
            "rag_hosts", "its hosts must be in gpu_hosts: the stack runs beside their services", host=host_name
        )
    if data.get("nvidia_toolkit_engine", "docker") != "docker":
        raise ConfigError(
            "nvidia_toolkit_engine", "the RAG stack runs on Docker: 'docker' on a host of rag_hosts", host=host_name
        )
    for field in ("rag_chat_service", "rag_embedding_service"):
        _service(data, field, host_name)
    for index, service in enumerate(data.get("inference_services") or []):
        if isinstance(service, dict) and service.get("name") in (WEBUI, VECTOR_DB):
            raise ConfigError(
                f"inference_services[{index}].name",
                f"{service['name']!r} is the RAG stack's own unit's name",
                host=host_name,
            )
    _check_admin(data, host_name)
    _check_ports(data, host_name)
    if data.get("rag_gateway_port"):
        _check_exposure(data, host_name, gateways)
    for name, value in (data.get("rag_webui_settings") or {}).items():
        _check_setting(name, value, host_name)
    if data.get("gpufleet_offline"):
        for field in ("rag_webui_image", "rag_vector_db_image"):
            if not offline.carries(data.get("gpufleet_bundle"), data.get(field)):
                raise ConfigError(
                    field,
                    f"{data.get(field)} is not among the bundle's images, and this offline host cannot pull it",
                    host=host_name,
                )


def _check_admin(data, host_name):
    if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", str(data.get("rag_admin_email") or "")):
        raise ConfigError("rag_admin_email", "is required: the first admin's e-mail address", host=host_name)
    path = data.get("rag_admin_password_file")
    if not path or not Path(path).is_file():
        raise ConfigError("rag_admin_password_file", f"{path}: no such file on the control node", host=host_name)
    if len(Path(path).read_text().strip()) < 12:
        raise ConfigError("rag_admin_password_file", f"{path}: a password of at least 12 characters", host=host_name)


def _check_ports(data, host_name):
    services = [s for s in data.get("inference_services") or [] if isinstance(s, dict)]
    used = {engines.port(s) for s in services} | {s["proxy_port"] for s in services if s.get("proxy_port")}
    for field in ("rag_port", "rag_vector_db_port"):
        if data.get(field) in used:
            raise ConfigError(field, f"port {data[field]} is one of this host's inference services'", host=host_name)
    if data.get("rag_port") == data.get("rag_vector_db_port"):
        raise ConfigError("rag_vector_db_port", "must differ from rag_port", host=host_name)


def _check_exposure(data, host_name, gateways):
    """A stack the gateway serves: a gateway in the inventory, ports of their own."""
    if not gateways:
        raise ConfigError(
            "rag_gateway_port", "no host of the inventory is in gateway_hosts to serve the stack on it", host=host_name
        )
    services = [s for s in data.get("inference_services") or [] if isinstance(s, dict)]
    used = {engines.port(s) for s in services} | {s["proxy_port"] for s in services if s.get("proxy_port")}
    if data.get("rag_front_port") in used | {data.get("rag_port"), data.get("rag_vector_db_port")}:
        raise ConfigError(
            "rag_front_port",
            f"port {data['rag_front_port']} is taken on this host (a service, rag_port or rag_vector_db_port)",
            host=host_name,
        )
    for field in ("gateway_port", "monitoring_gateway_metrics_port"):
        if data.get("rag_gateway_port") == data.get(field):
            raise ConfigError("rag_gateway_port", f"port {data[field]} is the gateway's {field}", host=host_name)
    others = [name for name in gateways if name != host_name]
    if others and (data.get("inference_listen") or "127.0.0.1").startswith(("127.", "::1", "localhost")):
        raise ConfigError(
            "inference_listen",
            f"the gateway {others[0]} reaches the stack's TLS front on this host, which would listen on "
            f"{data.get('inference_listen') or '127.0.0.1'} only: set an address it can reach (and admit it "
            "in inference_allowed_sources)",
            host=host_name,
        )


def _check_setting(name, value, host_name):
    """One of rag_webui_settings: an Open WebUI variable gpufleet does not set, no secret, on one line.
    A name that says it turns something on (ENABLE_API_KEY) is not a secret."""
    where = f"rag_webui_settings[{name!r}]"
    if not isinstance(name, str) or not SETTING.fullmatch(name):
        raise ConfigError(where, "an Open WebUI variable name (upper case, such as RAG_TEMPLATE)", host=host_name)
    if name in MANAGED:
        source = f" from {MANAGED[name]}" if MANAGED[name] else ""
        raise ConfigError(where, f"is set by gpufleet{source}", host=host_name)
    if not name.startswith("ENABLE_") and any(word in name for word in SECRET_WORDS):
        raise ConfigError(where, "looks like a secret: it would show in `docker inspect`; not here", host=host_name)
    if not isinstance(value, (str, int, bool)) or systemd_syntax.has_control_characters(str(value)):
        raise ConfigError(where, "a string, number or bool on one line (Docker's --env-file)", host=host_name)


def model_url(service):
    """Where the host itself reaches ``service``'s OpenAI API: its engine on loopback behind a TLS
    front (the front checks keys; the engine has none), otherwise where it listens."""
    engine_side = auth_proxy.engine_side(service) if service.get("proxy_port") else service
    return f"http://{engines.probe_address(engine_side)}:{engines.port(engine_side)}/v1", engine_side


def key_needed(service):
    """Whether Open WebUI must send ``service`` a key: the engine has one of its own (not behind a front)."""
    return bool(service.get("api_key_file")) and not service.get("proxy_port")


def webui_settings(data, chat, embedding):
    """Open WebUI's variables (pure): gpufleet's defaults, the site's rag_webui_settings, then what
    gpufleet manages. Values that are secrets are never here."""
    vector_db, port = data["rag_vector_db"], data["rag_vector_db_port"]
    chat_url, _ = model_url(chat)
    embedding_url, _ = model_url(embedding)
    managed = {
        "ENABLE_PERSISTENT_CONFIG": "false",  # the inventory's settings win at every start
        "OFFLINE_MODE": "true",
        # It copies its web app's static files into STATIC_DIR at every start (config.py; its default is
        # inside its package, which the read-only root keeps it from writing): the container's /tmp.
        "STATIC_DIR": "/tmp/static",
        **VECTOR_DBS[vector_db]["webui"](port),
        "OPENAI_API_BASE_URL": chat_url,
        "RAG_EMBEDDING_ENGINE": "openai",
        "RAG_OPENAI_API_BASE_URL": embedding_url,
        "RAG_EMBEDDING_MODEL": embedding.get("served_name") or embedding["name"],
    }
    site = {
        name: str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in (data.get("rag_webui_settings") or {}).items()
    }
    return {**DEFAULT_SETTINGS, **site, **managed}


def env_file_text(settings):
    """Docker's --env-file: one VAR=value a line, sorted."""
    return "".join(f"{name}={value}\n" for name, value in sorted(settings.items()))


def key_files(secrets_dir, chat, embedding):
    """use -> the host file of the key Open WebUI sends (chat, embeddings), for the services that need one."""
    uses = {"chat": chat, "embedding": embedding}
    return {
        use: posixpath.join(secrets_dir, f"{WEBUI}-{use}.key") for use, service in uses.items() if key_needed(service)
    }


def webui_command(keys):
    """The container's command: its image's own (``bash start.sh``), after reading the keys from their
    mounted files into the variables Open WebUI reads, so that they are in no ``docker inspect``."""
    if not keys:
        return []
    variables = {"chat": ["OPENAI_API_KEY"], "embedding": ["RAG_OPENAI_API_KEY"]}
    exports = [
        f'export {variable}="$(head -n1 {KEY_MOUNT.format(use=use)})"'
        for use in sorted(keys)
        for variable in variables[use]
    ]
    return ["bash", "-c", "; ".join([*exports, "exec bash start.sh"])]


def _run(part, user, read_only=True):
    """What both parts' ``docker run`` lines start with: detached, named, host network, their own
    account, nothing pulled at start, no capabilities, a small /tmp (and a read-only root unless told)."""
    args = ["run", "--detach", "--name", f"gpufleet-{part}", "--network", "host", "--init", "--pull", "never"]
    args += ["--user", user] + (["--read-only"] if read_only else [])
    return args + ["--tmpfs", "/tmp:rw,size=512m", "--security-opt", "no-new-privileges", "--cap-drop", "ALL"]


def vector_db_args(data, user, data_dir):
    """``docker run`` arguments of the vector database (pure)."""
    profile, port = VECTOR_DBS[data["rag_vector_db"]], data["rag_vector_db_port"]
    args = _run(VECTOR_DB, user, profile["read_only"]) + ["-v", f"{data_dir}:{profile['data_mount']}"]
    for name, value in sorted({**profile["env"](port), "HOME": "/tmp"}.items()):
        args += ["-e", f"{name}={value}"]
    return args + [data["rag_vector_db_image"], *profile["command"](port)]


def webui_args(data, user, data_dir, env_file, secret_key_file, keys):
    """``docker run`` arguments of Open WebUI (pure): loopback only, its data and secret key mounted,
    its settings from ``env_file``, its keys from their files."""
    args = _run(WEBUI, user) + ["-v", f"{data_dir}:{WEBUI_DATA}", "-v", f"{secret_key_file}:{WEBUI_SECRET_KEY_FILE}:ro"]
    for use, path in sorted(keys.items()):
        args += ["-v", f"{path}:{KEY_MOUNT.format(use=use)}:ro"]
    args += ["--env-file", env_file]
    for name, value in (("HOME", "/tmp"), ("HOST", "127.0.0.1"), ("PORT", str(data["rag_port"]))):
        args += ["-e", f"{name}={value}"]
    return args + [data["rag_webui_image"], *webui_command(keys)]


def unit_text(part, image, docker_args, ready_url, start_timeout, after=(), requires=()):
    """One part's systemd unit (pure); its words quoted for systemd."""
    return Template((TEMPLATES / "rag.service.j2").read_text(), keep_trailing_newline=True).render(
        part=part,
        image=image,
        container=f"gpufleet-{part}",
        tools_dir=TOOLS_DIR,
        docker_args=systemd_syntax.command_line(docker_args),
        ready_url=systemd_syntax.command_line([ready_url]),
        start_timeout=start_timeout,
        after=" ".join(after),
        requires=" ".join(requires),
    )


def units(data, ids, secrets_dir, chat, embedding):
    """unit name -> its text, for the vector database and Open WebUI (pure)."""
    root, timeout = data["rag_data_dir"], int(data["rag_start_timeout"])
    vector_db = VECTOR_DBS[data["rag_vector_db"]]
    db_unit = unit_name(VECTOR_DB)
    models = sorted({unit_name(chat["name"]), unit_name(embedding["name"])})
    return {
        db_unit: unit_text(
            VECTOR_DB,
            data["rag_vector_db_image"],
            vector_db_args(data, ids[VECTOR_DB], posixpath.join(root, "vectordb")),
            f"http://127.0.0.1:{data['rag_vector_db_port']}{vector_db['ready']}",
            timeout,
        ),
        unit_name(WEBUI): unit_text(
            WEBUI,
            data["rag_webui_image"],
            webui_args(
                data,
                ids[WEBUI],
                posixpath.join(root, "webui"),
                posixpath.join(secrets_dir, f"{WEBUI}.env"),
                posixpath.join(secrets_dir, f"{WEBUI}-secret-key"),
                key_files(secrets_dir, chat, embedding),
            ),
            f"http://127.0.0.1:{data['rag_port']}/health",
            timeout,
            after=[db_unit, *models],
            requires=[db_unit],
        ),
    }
