"""
What gpufleet knows of each inference engine's container: its port, readiness endpoints, API key
variable, the arguments it takes, and how its command line is made. Pure data and functions.
"""

import difflib
import ipaddress
import math
import re
from pathlib import Path

from operations.core import checks, systemd_syntax
from operations.core.errors import ConfigError
from operations.services.names import managed_name

CLI_DIR = Path(__file__).resolve().parent / "engine_cli"
WEIGHTS_MOUNT = "/models"
# Where a service listens unless inference_listen (or its own listen) says otherwise: this host only.
LOOPBACK = "127.0.0.1"
# Where an engine that reads its API key from a file finds it (mounted read-only).
KEY_MOUNT = "/run/secrets/gpufleet-api-key"
# A container's user when none is given (the deploy gives each service its own account).
DEFAULT_USER = "65534:65534"
# Where an engine that compiles keeps its caches (the service's own directory on the host, kept
# across restarts: a warm start skips the compile).
CACHE_MOUNT = "/cache"

ENGINES = {
    "vllm": {
        "port": 8000,
        "ready": ["/health", "/v1/models"],
        "metrics": "/metrics",  # Prometheus' text format, on by default, outside the key's routes
        "api_key_env": "VLLM_API_KEY",
        "api_key_file_flag": None,
        "needs_gpu": True,
        # `vllm serve --help=all` of vLLM 0.32.0 (engine_cli/README.md). vLLM's parser also takes
        # snake_case spellings and dotted keys of JSON options (--compilation-config.mode 3).
        "flags": "vllm-serve.help",
        "flag_spelling": lambda flag: flag.split(".", 1)[0].replace("_", "-"),
        # Its --api-key "only authenticates endpoints under the /v1, /v2, and /inference path
        # prefixes ... /invocations (which exposes the same inference capabilities as /v1) remain[s]
        # unauthenticated" (its --help): beyond loopback it needs the proxy, like an unkeyed engine.
        "key_guards_every_route": False,
        "managed": {
            "--model": "model",
            "--served-model-name": "served_name",
            "--host": "port",
            "--port": "port",
            "--api-key": "api_key_file",
        },
        "env": {"HOME": "/tmp", "HF_HOME": "/tmp/hf", "HF_HUB_OFFLINE": "1"},
        # torch.compile's and vLLM's own caches (its --help: VLLM_CACHE_ROOT, default ~/.cache/vllm,
        # which would be the 1 GiB /tmp tmpfs, lost at every restart).
        "caches": {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton"},
        "parallel_flags": {
            "--tensor-parallel-size": "tensor",
            "-tp": "tensor",
            "--pipeline-parallel-size": "pipeline",
            "-pp": "pipeline",
        },
    },
    "tgi": {
        "port": 3000,  # not the image's 80: the container runs as an unprivileged account
        "ready": ["/health"],
        "metrics": "/metrics",  # on by default (router/src/server.rs)
        "api_key_env": "API_KEY",
        "api_key_file_flag": None,
        "needs_gpu": True,
        "flags": "tgi-launcher.flags",
        # Its router (router/src/server.rs at db931fc, 2026-01-08, lines 2203-2244) puts the key on
        # the generation routes only: /info, /metrics, /v1/models and POST /chat_tokenize (which runs
        # the tokenizer) answer without it, and the key is compared case-insensitively
        # (to_lowercase on both sides). Beyond loopback it needs the proxy, like vLLM.
        # (Excerpt: tests/data/upstream/tgi-router-server-auth.rs.txt.)
        "key_guards_every_route": False,
        "parallel_flags": {"--num-shard": "tensor"},
        # set by gpufleet from the service's fields: refused in args, naming the field
        "managed": {
            "--model-id": "model",
            "--hostname": "port",
            "--port": "port",
            "-p": "port",
            "--api-key": "api_key_file",
            "--ngrok": None,
            "--ngrok-authtoken": None,
            "--ngrok-edge": None,
        },
        "env": {"HOME": "/tmp", "HF_HOME": "/tmp/hf", "HF_HUB_OFFLINE": "1"},
    },
    "ollama": {
        "port": 11434,
        "ready": ["/api/tags"],
        "metrics": None,  # Ollama serves no Prometheus metrics
        "api_key_env": None,  # Ollama has no API key: put an authenticating proxy in front of it
        "api_key_file_flag": None,
        "needs_gpu": False,
        "flags": set(),  # `ollama serve` takes no flags: OLLAMA_* variables configure it
        "key_guards_every_route": False,
        "managed": {},
        # Its weight volume is an Ollama models directory (OLLAMA_MODELS, read-only): no prune at
        # start, which deletes blobs no manifest names (server/routes.go Serve, fb30760, 2026-08-21).
        "env": {"HOME": "/tmp", "OLLAMA_NOPRUNE": "1"},
        # What that directory holds (manifest/paths.go: OLLAMA_MODELS/blobs, OLLAMA_MODELS/manifests).
        # (Excerpts: tests/data/upstream/ollama-serve-start.go.txt.)
        "model_layout": ("manifests/", "blobs/"),
    },
    "llamacpp": {
        "port": 8080,
        "ready": ["/health", "/v1/models"],
        "metrics": "/metrics",  # with --metrics, which gpufleet passes (llama-server.help)
        "api_key_env": "LLAMA_API_KEY",
        "api_key_file_flag": "--api-key-file",
        "needs_gpu": False,
        "flags": "llama-server.help",
        "key_guards_every_route": True,
        "managed": {
            "-m": "model",
            "--model": "model",
            "-a": "served_name",
            "--alias": "served_name",
            "--host": "port",
            "--port": "port",
            "--api-key": "api_key_file",
            "--api-key-file": "api_key_file",
        },
        "env": {},
    },
}


def flags_from_help(text):
    """The flags a ``--help`` text lists: every ``-x``/``--long`` in the option column of lines that
    start with a dash, at most two spaces in (``-c,    --ctx-size N   description`` gives -c and
    --ctx-size; argparse's ``  --api-server-count N, -asc N`` gives both)."""
    flags = set()
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        line = line.lstrip(" ")
        if indent > 2 or not line.startswith("-") or line.startswith("---"):
            continue
        options = re.split(r"\s{2,}(?=[^-\s])", line, maxsplit=1)[0]
        for alternative in re.split(r",\s*", options):
            word = alternative.strip().split(" ")[0]
            if word.startswith("-"):
                flags.add(word)
    return flags


def accepted_flags(engine):
    """What ``engine`` takes: its captured CLI (engine_cli/), the set in its profile, or None (not known)."""
    flags = ENGINES[engine]["flags"]
    if flags is None or isinstance(flags, set):
        return flags
    text = (CLI_DIR / flags).read_text()
    if flags.endswith(".help"):
        return flags_from_help(text)
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")
FIELDS = {
    "name",
    "engine",
    "image",
    "model",
    "port",
    "gpus",
    "memory",
    "shm_size",
    "args",
    "api_key_file",
    "hf_token_file",
    "network",
    "cuda",
    "user",
    "served_name",
    "start_timeout",
    "listen",
    "proxy_port",
    "ipc",
}


def is_loopback(address):
    return ipaddress.ip_address(address).is_loopback


def _fail(index, field, message, host_name):
    raise ConfigError(f"inference_services[{index}].{field}", message, host=host_name)


def check_service(index, service, host_name=None):
    """Raise ConfigError naming ``inference_services[i].<field>`` for the first bad field."""
    if not isinstance(service, dict):
        _fail(index, "", "each service is a dict of name, engine, image, model ...", host_name)
    for field in service:
        if field not in FIELDS:
            _fail(index, field, f"unknown field (known: {', '.join(sorted(FIELDS))})", host_name)
    for field in ("name", "engine", "image", "model"):
        if not isinstance(service.get(field), str) or not service[field]:
            _fail(index, field, "is required", host_name)
    if not NAME.fullmatch(service["name"]):
        _fail(index, "name", "lower-case letters, digits and '-', up to 41", host_name)
    if service["engine"] not in ENGINES:
        _fail(index, "engine", f"unknown engine {service['engine']!r} (one of {', '.join(ENGINES)})", host_name)
    image = service["image"]
    if not checks.is_pinned_image(image):
        _fail(index, "image", f"{image!r} must be pinned by tag or digest, never latest", host_name)
    if service["model"].startswith("/") or ".." in service["model"].split("/"):
        _fail(index, "model", "a path inside the weight volumes root, such as 'tiny/tiny.gguf'", host_name)
    own_port = service.get("port")
    if own_port is not None and not (isinstance(own_port, int) and 0 < own_port < 65536):
        _fail(index, "port", "a TCP port number", host_name)
    gpus = service.get("gpus", "all")
    if not (
        gpus in ("all", "none")
        or (isinstance(gpus, list) and gpus and all(isinstance(g, int) and g >= 0 for g in gpus))
    ):
        _fail(index, "gpus", "'all', 'none' or a list of GPU indices", host_name)
    for field in ("memory", "shm_size"):
        if service.get(field) is not None and not checks.is_size(service[field]):
            _fail(index, field, "a size such as '16g' (k, m or g)", host_name)
    if service.get("ipc") not in (None, "host"):
        _fail(index, "ipc", "'host' (the host's IPC namespace, for tensor parallelism) or unset (shm_size)", host_name)
    if service.get("ipc") and service.get("shm_size"):
        _fail(index, "shm_size", "not with ipc: host (the container then uses the host's /dev/shm)", host_name)
    if service.get("listen") is not None and not checks.is_address(service["listen"]):
        _fail(index, "listen", "an IP address of the host (127.0.0.1, 10.0.0.5, 0.0.0.0 for all)", host_name)
    if service.get("network", "host") not in ("host", "bridge"):
        _fail(index, "network", "'host' (default: lowest streaming latency) or 'bridge'", host_name)
    profile = ENGINES[service["engine"]]
    proxy_port = service.get("proxy_port")
    if proxy_port is not None:
        if not (isinstance(proxy_port, int) and 0 < proxy_port < 65536) or proxy_port == port(service):
            _fail(index, "proxy_port", "a TCP port number other than the service's own", host_name)
        if not service.get("api_key_file"):
            _fail(
                index, "proxy_port", "the proxy checks the service's key: give the service an api_key_file", host_name
            )
    elif service.get("api_key_file") and not profile["api_key_env"]:
        _fail(
            index,
            "api_key_file",
            f"{service['engine']} has no API key of its own: set proxy_port to put "
            "gpufleet's authenticating proxy in front of it, which checks this key",
            host_name,
        )
    args = service.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        _fail(index, "args", "a list of strings", host_name)
    for field in ("args", "served_name", "model"):
        values = args if field == "args" else [service.get(field) or ""]
        if any(isinstance(value, str) and systemd_syntax.has_control_characters(value) for value in values):
            _fail(
                index,
                field,
                "may not hold control characters (a newline, a tab...): systemd cannot pass them to the engine",
                host_name,
            )
    accepted = accepted_flags(service["engine"])
    spelling = profile.get("flag_spelling") or (lambda flag: flag)
    for arg in args:
        flag = spelling(arg.split("=", 1)[0])
        if not flag.startswith("-") or flag.lstrip("-").replace(".", "").isdigit():
            continue  # a value (a negative number included)
        if flag in profile["managed"]:
            field = profile["managed"][flag]
            _fail(
                index,
                "args",
                f"{flag} is set by gpufleet" + (f" from the service's {field}" if field else ", never from args"),
                host_name,
            )
        if accepted is not None and flag not in accepted:
            close = difflib.get_close_matches(flag, sorted(accepted), n=1)
            _fail(
                index,
                "args",
                f"{service['engine']} does not take {flag}"
                + (
                    f" (did you mean {close[0]}?)"
                    if close
                    else f" (it takes: {', '.join(sorted(accepted)) or 'no flags'})"
                ),
                host_name,
            )
    given, needed = service.get("gpus", "all"), gpus_needed(service)
    if isinstance(given, list) and needed > len(given) or given == "none" and needed > 1:
        _fail(
            index,
            "args",
            f"its parallel sizes need {needed} GPUs (tensor x pipeline), but gpus gives it "
            f"{len(given) if isinstance(given, list) else 0}",
            host_name,
        )
    if service.get("user") is not None and not re.fullmatch(r"\d+(:\d+)?", str(service["user"])):
        _fail(index, "user", "a numeric UID or UID:GID (default: the service's own account, gpufleet-NAME)", host_name)
    if service.get("cuda") is not None and not re.fullmatch(r"\d+\.\d+(\.\d+)?", str(service["cuda"])):
        _fail(index, "cuda", "the CUDA version the image was built for, such as '12.4'", host_name)


def gpus_needed(service):
    """The GPUs a service's own arguments spread it over: tensor x pipeline parallel sizes (1 if unset)."""
    profile = ENGINES[service["engine"]]
    flags, spelling = profile.get("parallel_flags", {}), profile.get("flag_spelling") or (lambda flag: flag)
    sizes = {"tensor": 1, "pipeline": 1}
    args = list(service.get("args", []))
    for position, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        flag = spelling(flag)
        value = value or (args[position + 1] if position + 1 < len(args) else "")
        if flag in flags and value.isdigit():
            sizes[flags[flag]] = int(value)
    return sizes["tensor"] * sizes["pipeline"]


def guarded(service):
    """Whether every request to the service must carry its key: the authenticating proxy checks it,
    or the engine's own key covers every route (not vLLM's, never Ollama, which has none)."""
    if service.get("proxy_port"):
        return True
    return bool(service.get("api_key_file")) and ENGINES[service["engine"]]["key_guards_every_route"]


def exposed_ports(service):
    """The ports a service answers on beyond the host when it listens there: the proxy's, or its own."""
    return [service["proxy_port"]] if service.get("proxy_port") else [port(service)]


def port(service):
    """The host port a service listens on: its own, or its engine's default."""
    return service.get("port") or ENGINES[service["engine"]]["port"]


def listen(service):
    """The host address a service listens on (inference_listen, resolved into the service by the deploy)."""
    return service.get("listen") or LOOPBACK


def _url_host(address):
    return f"[{address}]" if ":" in address else address


def probe_address(service):
    """Where the host itself reaches the service: its address, or loopback when it listens on all."""
    address = listen(service)
    return LOOPBACK if address in ("0.0.0.0", "::") else address


def fitting_start_timeout(setting, model_bytes):
    """Seconds a service may take to get ready: the setting, or more for a large model: two minutes for
    the engine itself plus its weights read at 100 MB/s (a disk's pace, not NVMe's)."""
    return max(setting, 120 + math.ceil((model_bytes or 0) / 100e6))


def gpu_count(gpus, available):
    return 0 if gpus == "none" else (available if gpus == "all" else len(gpus))


def docker_args(
    service, weights_root, env_file, use_gpus, user=DEFAULT_USER, key_file=None, host_gpus=1, cache_dir=None
):
    """The ``docker run`` arguments for a service (pure: unit-tested). ``host_gpus``: how many the host
    has (what ``gpus: all`` gives, to size shared memory); ``cache_dir``: the service's cache
    directory on the host, for an engine that keeps caches."""
    profile = ENGINES[service["engine"]]
    name = managed_name(service["name"])
    listen_port = port(service)
    bind = listen(service) if service.get("network", "host") == "host" else "0.0.0.0"
    gpus = service.get("gpus", "all")
    # Logs: json-file, rotated as daemon.json says (docker_log_max_size / docker_log_max_file).
    args = [
        "run",
        "--detach",  # its unit's main process follows it (gpufleet-container-follow)
        # No --rm: Docker before 24.0.8 removes --rm containers at a restart even with live-restore
        # (moby/moby#46308); the unit removes the container before it starts and after it stops.
        "--name",
        name,
        "--init",
        "--pull",
        "never",
        "--user",
        user,
        "--read-only",
        "--tmpfs",
        "/tmp:rw,size=1g",
        "--security-opt",
        "no-new-privileges",
        "--cap-drop",
        "ALL",
        "-v",
        f"{weights_root}:{WEIGHTS_MOUNT}:ro",
    ]
    host_network = service.get("network", "host") == "host"
    if host_network:
        args += ["--network", "host"]
    else:  # published on the listen address only; the engine listens on the container's own
        args += ["-p", f"{_url_host(listen(service))}:{listen_port}:{listen_port}"]
    if use_gpus:
        args += ["--gpus", "all" if gpus == "all" else '"device=' + ",".join(str(g) for g in gpus) + '"']
    if service.get("memory"):
        args += ["--memory", service["memory"]]
    # Shared memory: 1 GiB per GPU the container gets (NCCL and the engine's workers), or the host's
    # IPC namespace on request (tensor parallelism across many GPUs).
    shm = service.get("shm_size") or (f"{max(1, gpu_count(gpus, host_gpus))}g" if profile["needs_gpu"] else None)
    if service.get("ipc") == "host":
        args += ["--ipc", "host"]
    elif shm:
        args += ["--shm-size", shm]
    if env_file:
        args += ["--env-file", env_file]
    if key_file:
        args += ["-v", f"{key_file}:{KEY_MOUNT}:ro"]
    # Its account's name, which the image's /etc/passwd does not know (Python's getpass reads these).
    environment = {**profile["env"], "USER": name, "LOGNAME": name}
    if cache_dir and profile.get("caches"):
        args += ["-v", f"{cache_dir}:{CACHE_MOUNT}"]
        environment.update({key: f"{CACHE_MOUNT}/{sub}" for key, sub in profile["caches"].items()})
    for key, value in sorted(environment.items()):
        args += ["-e", f"{key}={value}"]
    if service["engine"] == "ollama":
        args += [
            "-e",
            f"OLLAMA_MODELS={WEIGHTS_MOUNT}/{service['model']}",
            "-e",
            f"OLLAMA_HOST={_url_host(bind)}:{listen_port}",
        ]
    args.append(service["image"])
    return args + engine_args(service, listen_port, use_gpus, key_in_file=key_file is not None, bind=bind)


def engine_args(service, listen_port, use_gpus, key_in_file=False, bind=LOOPBACK):
    model = f"{WEIGHTS_MOUNT}/{service['model']}"
    served = service.get("served_name") or service["name"]
    extra = list(service.get("args", []))
    engine = service["engine"]
    if engine == "vllm":
        return ["--model", model, "--served-model-name", served, "--host", bind, "--port", str(listen_port), *extra]
    if engine == "tgi":
        return ["--model-id", model, "--hostname", bind, "--port", str(listen_port), *extra]
    if engine == "llamacpp":
        layers = (
            []
            if any(a.split("=")[0] in ("-ngl", "--n-gpu-layers") for a in extra)
            else ["--n-gpu-layers", "999" if use_gpus else "0"]
        )
        keyed = ["--api-key-file", KEY_MOUNT] if key_in_file else []
        metrics = [] if "--metrics" in extra else ["--metrics"]
        return [
            "-m", model, "--alias", served, "--host", bind, "--port", str(listen_port),
            *layers, *metrics, *keyed, *extra,
        ]  # fmt: skip
    return ["serve"] if engine == "ollama" else []


def ready_urls(service):
    return [
        f"http://{_url_host(probe_address(service))}:{port(service)}{path}"
        for path in ENGINES[service["engine"]]["ready"]
    ]
