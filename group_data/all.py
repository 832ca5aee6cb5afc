"""
Every gpufleet tunable, with its default. Override per group (group_data/<group>.py) or per
host (host data in the inventory). Names are prefixed by concern; a misspelt name is an error.
"""

# --- gpufleet (every host) ---------------------------------------------------------------
# Where gpufleet keeps host configuration; secrets go in <dir>/secrets (root only, 0700).
gpufleet_config_dir = "/etc/gpufleet"
# Where gpufleet keeps state: staged repositories, markers.
gpufleet_state_dir = "/var/lib/gpufleet"
# True for hosts that can reach nothing: no apt update, packages only from a local repository.
gpufleet_offline = False
# Room kept free on top of what a host receives: staging (bundle, weight volumes, relays) and hub
# fetches are refused before any byte is sent when the destination's filesystem lacks it.
gpufleet_free_space_margin = "1g"
# Pull staged files (bundle, images, weight volumes) from this host of the site instead of the
# control node: it stages them first, then serves them over a one-run SSH key limited to
# gpufleet-relay-send (removed after, expiring within the hour). None, or the host's own name:
# from the control node. Set it for a group to spare the control node's link.
gpufleet_stage_via = None
# How staged bytes travel to a host: "openssh" streams them through this machine's OpenSSH client
# (`ssh`, reaching the host with the inventory's ssh_hostname, ssh_port, ssh_user, ssh_key,
# ssh_config_file and known_hosts, AES-GCM first, never prompting) while pyinfra keeps the control;
# a login with a password, key passphrase or sudo password, or an `ssh` that cannot connect, falls
# back to pyinfra's own connection. "paramiko": always pyinfra's connection.
# One of: openssh | paramiko
gpufleet_stage_transport = "openssh"
# How the other hosts of the site reach this one when it is a seed (default: its ssh_hostname).
gpufleet_site_address = None
gpufleet_site_port = 22
# A host that freezes (a hung kernel, a network black hole: its TCP connection stays open, nothing
# answers) is failed, named, and the run goes on with the others: every gpufleet_liveness_interval
# seconds each host's SSH server is asked for a new channel; one that grants none within
# gpufleet_liveness_timeout seconds is taken as frozen and its connection closed. A busy host (a
# DKMS build, a model load) still answers: its SSH server is not what is busy.
gpufleet_liveness_interval = 10
gpufleet_liveness_timeout = 20
# Every key of the inventory's data is checked: a key gpufleet and pyinfra do not know stops the run
# (naming it, with the closest known key). Data your own deploys read from the same inventory: list
# its keys here, and gpufleet leaves them alone.
gpufleet_other_data = []
# Rolling changes. upgrade.py: GPU hosts whose driver or toolkit is not the pinned one are upgraded
# this many at a time (the same on every host), each drained first: its services get this many
# seconds to finish open requests, then stop. deploy.py and upgrade.py: on hosts that serve, service
# restarts (a unit, secrets, image or weights changed) go this many hosts at a time, each service's
# open requests finished first. Either halts, leaving the later batches as they were, once more than
# gpufleet_upgrade_max_failed of its hosts have failed.
gpufleet_upgrade_batch = 1
gpufleet_upgrade_drain_timeout = 60
gpufleet_upgrade_max_failed = 0
# True: container images and weight volumes (under inference_weights_root) that no service of the
# host uses are removed once its services run, and a host that left rag_hosts loses the RAG stack's
# data and secrets. Off: they stay, to be used again without a transfer.
gpufleet_prune = False

# --- ssh_ (pyinfra's SSH connector, paramiko) -------------------------------------------
# Use AES-GCM only: with paramiko, AES-CTR + HMAC-SHA2 streams at about 130 MB/s on the benchmark
# machine and AES-GCM at about 200 MB/s (staging of weights and bundles). Every OpenSSH since 6.2
# offers AES-GCM; for an sshd that does not, set this to {} for its group.
ssh_paramiko_connect_kwargs = {
    "disabled_algorithms": {
        "ciphers": ["aes128-ctr", "aes192-ctr", "aes256-ctr", "aes128-cbc", "aes192-cbc", "aes256-cbc", "3des-cbc"]
    }
}

# --- docker_ (the container runtime) ------------------------------------------------
# apt packages of the engine (Debian/Ubuntu's own docker.io by default).
docker_packages = ["docker.io"]
# Container log rotation merged into /etc/docker/daemon.json (json-file driver).
docker_log_max_size = "50m"
docker_log_max_file = 3
# More daemon.json keys to merge; keys already in the file and not named here are kept.
docker_daemon_settings = {}
# Pull-through caches for Docker Hub images ("registry-mirrors" in daemon.json), e.g.
# ["https://mirror.example.internal:5000"].
docker_registry_mirrors = []
# Private registries signed by your own CA: "host:port" -> CA certificate file on the control node,
# installed as /etc/docker/certs.d/<host:port>/ca.crt (Docker reads it per connection: no restart).
docker_registry_ca_files = {}
# Registries that need a login: "host:port" -> a file on the control node, readable by its owner
# only, whose first line is USERNAME:PASSWORD. `docker login --password-stdin` on the host: the
# password reaches it on stdin only, never in a command line or a log.
docker_registry_logins = {}

# --- nvidia_driver_ (NVIDIA driver) ------------------------------------------------------
# Where the driver comes from: "distro" (Debian non-free; Ubuntu's server branch with Canonical's
# signed precompiled modules), "cuda-repo" (NVIDIA's CUDA apt repository), "local-repo" (a flat
# repository already on the host, nvidia_driver_local_repo) or "bundle" (the offline bundle's
# repository, staged by the run; what airgapped hosts use).
# One of: distro | cuda-repo | local-repo | bundle
nvidia_driver_source = "distro"
# The driver: a branch ("580": the newest version apt offers of it when first installed, then held
# there) or an exact upstream version ("580.173.02", any distro revision of it). An exact version
# the host's apt sources no longer offer (Ubuntu keeps only a release's and the latest update's) is
# refused, naming the versions they have. Ubuntu's -server packages of an ended branch are
# transitional to another branch (570-server -> 580-server): pinning such a branch is refused.
nvidia_driver_version = "535.261.03"
# NVIDIA's open kernel modules (Ubuntu's -open flavours, Debian's nvidia-open-kernel-dkms): needed
# by Blackwell GPUs, refused on GPUs older than Turing (PCI device ids, from pci.ids).
nvidia_driver_open = False
# Debian mirrors used to enable contrib, non-free and non-free-firmware.
nvidia_driver_debian_mirror = "http://deb.debian.org/debian"
nvidia_driver_debian_security_mirror = "http://deb.debian.org/debian-security"
# NVIDIA's CUDA repository for source "cuda-repo" (None: derived from the distro and release).
nvidia_driver_cuda_repo_url = None
# A flat apt repository already on the host, for source "local-repo" (an offline bundle).
nvidia_driver_local_repo = "/var/lib/gpufleet/repo"
# Secure Boot on: True once DKMS signs with a MOK you enrolled; otherwise the deploy refuses.
nvidia_driver_secure_boot_signed = False
# Allow a reboot when a GPU host's driver or nouveau blacklist changed (never the control node).
nvidia_driver_reboot = False
nvidia_driver_reboot_timeout = 600

# --- nvidia_toolkit_ (NVIDIA Container Toolkit) ------------------------------------------
# The four toolkit packages are installed at <version>-1, held and pinned.
nvidia_toolkit_version = "1.17.8"
# "nvidia-repo" (NVIDIA's apt repository, signed-by keyring), "local-repo" (staged on the host) or
# "bundle" (the offline bundle's repository).
# One of: nvidia-repo | local-repo | bundle
nvidia_toolkit_source = "nvidia-repo"
# Where the local repository lives on the host, and (optionally) a control-node directory to stage.
nvidia_toolkit_local_repo = "/var/lib/gpufleet/toolkit-repo"
nvidia_toolkit_local_repo_src = None
# The container runtime GPU hosts run: "docker" (the inference services need it), "containerd" (Kubernetes
# nodes, nerdctl: the nvidia runtime in its CRI config, containerd restarted on change) or "podman"
# (a CDI spec /etc/cdi/nvidia.yaml, generated on hosts with GPUs).
# One of: docker | containerd | podman
nvidia_toolkit_engine = "docker"
# Make nvidia Docker's default runtime (otherwise containers ask for it with --gpus / --runtime).
nvidia_toolkit_set_as_default = False
# Link the GPU device nodes into /dev/char (udev rule + now): with systemd-managed cgroups runc
# finds devices by these links; without them containers lose their GPUs after a daemon-reload.
nvidia_toolkit_dev_char_symlinks = True
# After the driver, toolkit or Docker changed on a host with a GPU, `docker run --gpus all` this
# image with nvidia-smi. Pinned; an offline host never pulls it: an offline GPU host whose bundle
# lacks it is refused before any host changes (add it to the bundle's images).
nvidia_toolkit_check_image = "nvidia/cuda:12.2.2-base-ubuntu22.04"

# --- offline bundle (python -m operations.offline.bundle build SPEC --out DIR) ---------------------
# A bundle directory on the control node: its manifest is verified before any host is touched,
# then its apt repository, images and weight volumes are staged (resumable, SHA-256 verified).
gpufleet_bundle = None
# Where the bundle's packages and image archives are staged on the host.
gpufleet_bundle_dir = "/var/lib/gpufleet/bundle"
# An ssh-keygen allowed_signers file on the control node: when set, the bundle's manifest must
# carry a signature (build --sign-key) by one of its keys, or the run stops before any host.
gpufleet_bundle_signers = None

# --- gpufleet_tls_ (the site's TLS: what the services' fronts present) -------------------------
# gpufleet's site CA on the control node, made in this directory the first time a front needs it
# (ca.key stays here; hand ca.crt to clients): it signs each host a certificate naming its
# addresses (127.0.0.1, gpufleet_site_address, ssh_hostname, its inventory name), kept in
# <dir>/hosts, renewed 30 days before its end.
gpufleet_tls_dir = "~/.local/share/gpufleet/site-tls"
# Or the site's own PKI: this host's certificate, its key and the CA that signed them, as files on
# the control node (all three, or none).
gpufleet_tls_cert_file = None
gpufleet_tls_key_file = None
gpufleet_tls_ca_file = None

# --- gateway_ (the site's gateway: hosts of the gateway_hosts group) ----------------------------
# HAProxy from the distribution: https://GATEWAY:gateway_port/SERVICE/v1 is service SERVICE's pool,
# every host of the inventory serving it behind a TLS front (proxy_port), checked every
# gateway_check_interval seconds (out after 2 failures, in after 2 successes), least connections
# first; keys are the service's api_key_file (checked at the gateway and again at the front). A
# rolling restart drains a host's servers at every gateway first and re-admits them once ready.
gateway_port = 443
gateway_listen = "0.0.0.0"
gateway_check_interval = 2
# Who may reach the gateway's port (gpufleet's nftables table, as for inference_allowed_sources):
# the clients' addresses or networks; a gateway with none is refused unless inference_firewall is False.
gateway_allowed_sources = []

# --- monitoring_ (Prometheus on the hosts of monitoring_hosts; exporters on the others) -------
# With a host in monitoring_hosts, every other host of the inventory runs the node exporter from
# the distribution (its systemd collector watching gpufleet's units), each engine behind a TLS front
# (proxy_port) serves its own metrics there to the monitoring hosts without a key (vLLM's and TGI's
# /metrics, llama.cpp's with --metrics; Ollama has none), and a gateway serves HAProxy's. The
# firewall admits those ports from the monitoring hosts' addresses only. A monitoring host runs
# Prometheus from the distribution on 127.0.0.1 (reach it through SSH: ssh -L 9090:127.0.0.1:9090),
# its targets written from the inventory and gpufleet's alert rules beside them. With no monitoring
# host, the exporters are stopped and gpufleet's Prometheus configuration removed.
monitoring_node_exporter_port = 9100
monitoring_gateway_metrics_port = 8405
monitoring_prometheus_port = 9090
# GPU metrics: NVIDIA's dcgm-exporter on each GPU host of gpu_hosts (a host without a GPU skips it and
# says so: set this False for such a host, so that Prometheus does not wait for it), from this pinned
# image (loaded by the deploy; offline bundles must carry it; the unit never pulls), on this port.
monitoring_gpu_metrics = True
monitoring_dcgm_exporter_image = "nvcr.io/nvidia/k8s/dcgm-exporter:4.2.3-4.1.3-ubuntu22.04"
monitoring_dcgm_exporter_port = 9400
# Seconds between scrapes, and how long a condition must hold before its alert fires.
monitoring_scrape_interval = 15
monitoring_alert_after = 120
# How long Prometheus keeps samples, and where.
monitoring_retention = "30d"
monitoring_storage_path = "/var/lib/prometheus/metrics2"
# Alert thresholds: free space on a host's weights filesystem (percent), a GPU's temperature (C).
monitoring_weights_free_percent = 10
monitoring_gpu_temperature_limit = 87

# --- inference_ (model services as systemd-managed containers) ----------------------------
# Services of the host. Each: name, engine (vllm | tgi | ollama | llamacpp), image (pinned tag or
# digest, never latest), model (path under the weights root, e.g. "tiny/tiny.gguf"), and optional
# port (engine default: vLLM 8000, TGI 3000, Ollama 11434, llama.cpp 8080), gpus ("all", "none" or
# indices), memory ("16g"), shm_size (default 1g per GPU for vLLM/TGI), args (engine flags, checked),
# api_key_file / hf_token_file (files on the control node), network ("host", the default for
# streaming latency, or "bridge"), cuda (the image's CUDA version, checked against
# nvidia_driver_version), served_name, user (numeric "UID:GID"; default: the service's own account
# gpufleet-NAME, its own UID), start_timeout, listen (overrides inference_listen), proxy_port.
# proxy_port puts an authenticating TLS front in front (gpufleet-NAME-proxy.service: HAProxy from
# the distribution, with the site's certificate, gpufleet_tls_*): the engine then listens on
# 127.0.0.1 with no key of its own, and the front listens on the service's address and port
# proxy_port, admitting only requests that carry a key of the api_key_file (one per line: add the
# new key, deploy, hand it out, remove the old one, deploy; a reload, no request lost) as
# "Authorization: Bearer KEY" (401 otherwise). Ollama, which has no key, and vLLM and TGI, whose
# keys leave routes open, are served beyond loopback only this way, unless
# inference_expose_unauthenticated is True.
# A service removed from this list is removed from the host when the deploy runs: its units are
# stopped and disabled, its unit files, secrets, container and account deleted (its port is free
# before any new service starts). Its image and weights stay.
# Secrets on the host: llama.cpp reads its API key from a file only the service's account can read,
# mounted read-only (--api-key-file): it is in no environment and not in `docker inspect`. vLLM and
# TGI take theirs from the environment (VLLM_API_KEY, API_KEY; no file option), and the hub token
# goes there too: a root-only --env-file, which puts them in the container's Config.Env, readable
# through `docker inspect` by root and by members of the docker group (who are root-equivalent).
inference_services = []
# The address services listen on (a service's own "listen" wins): 127.0.0.1, this host only (put
# a proxy or an SSH tunnel in front), an address of the host, or 0.0.0.0 for all of them. A service
# whose key does not guard every request (no api_key_file; Ollama, which has no key; vLLM, whose key
# leaves /invocations open) is refused on any address but loopback, unless it has a proxy_port or
# inference_expose_unauthenticated is True: your choice, named.
inference_listen = "127.0.0.1"
inference_expose_unauthenticated = False
# The host firewall (nftables table "inet gpufleet", loaded at boot by gpufleet-firewall.service;
# nftables is installed, and offline bundles carry it): the services' ports, and their proxies',
# admit connections from the host itself and from these addresses or networks only; any other gets
# a TCP reset. A service listening beyond loopback needs at least one ("10.0.0.0/8", "192.0.2.7",
# "fd00::/8"). The table sits beside the host's other rules (Docker's, ufw's) and only narrows them.
inference_allowed_sources = []
# False: leave the host's firewall to you (ufw, firewalld, your own nftables); the table is not written.
inference_firewall = True
# Seconds a service may take to answer its readiness endpoints after a (re)start; raised for a
# service whose model needs more (2 minutes + its bytes at 100 MB/s), unless it sets its own start_timeout.
inference_start_timeout = 300
# A front (proxy_port) refuses a request body over this size (413) or without a Content-Length (411),
# before reading it; and gives up on a request after this many seconds without a byte either way.
inference_max_request_bytes = "32m"
inference_request_timeout = 900
# Images: one the offline bundle carries is loaded from it; any other is pulled from its registry by
# the deploy (never at unit start). A tag is checked against its registry on each run: when the
# registry moved it, the deploy says so and keeps the image the host has, unless this is True.
inference_image_follow_tag = False
# Weight volumes live here (one directory per volume, files 0444 root), mounted :ro at /models.
inference_weights_root = "/srv/gpufleet/weights"
# Weight volumes besides the bundle's, by name (a service's model "NAME/path" uses volume NAME):
#   {"qwen": {"from": "/models/qwen"}}  staged from a directory on the control node (resumable,
#                                       SHA-256 verified, skipped when intact)
#   {"qwen": {"hf": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "<40-hex commit>",
#             "token_file": "/root/.config/gpufleet/hf-token"}}   fetched on the host from the hub
#                                       (token_file optional, root-only on the control node; optional
#                                       allow_patterns / ignore_patterns as snapshot_download takes them,
#                                       e.g. "ignore_patterns": ["original/"] for Meta's .pth copies)
# A host gets only the volumes its services use.
inference_weight_volumes = {}
# The hub hf volumes come from (HF_ENDPOINT): None for huggingface.co, or a site mirror's URL.
inference_hf_endpoint = None
# Allow a branch or tag as an hf volume's revision: the commit it names is asked on each run and a
# move is fetched (and the services using it restarted). Off: only a pinned commit is accepted.
inference_weights_follow_branch = False

# --- proxmox_ (Proxmox VE LXC GPU passthrough: groups proxmox_hosts and lxc_guests) ---------
# A guest (host data): the inventory name of its Proxmox VE host and its VMID. The guest's driver
# libraries are installed at exactly the host's version (its loaded module's); a guest pinned to
# another nvidia_driver_version is refused before anything changes.
proxmox_host = None
proxmox_vmid = None
# How devices are passed: "dev" (devN entries, Proxmox VE 8.1+), "lxc" (lxc.cgroup2.devices.allow
# per major + lxc.mount.entry per node) or "auto" (dev from 8.1, lxc before).
# One of: auto | dev | lxc
proxmox_passthrough = "auto"
# Restart a running guest when its devices or features changed (at the end of the run); otherwise
# the deploy says a restart is needed.
proxmox_guest_restart = False
# Turn on nesting (and keyctl for unprivileged guests), which Docker inside LXC needs.
proxmox_docker_features = True
# A Proxmox host: the kernel headers package DKMS builds the module against (None: the running
# kernel's, proxmox-headers-<uname -r> on Proxmox VE 8, pve-headers-<uname -r> before).
proxmox_kernel_headers = None

# --- rag_ (the local RAG stack: hosts of the rag_hosts group) --------------------------------
# Open WebUI, a vector database and the fleet's own models, for the people who use them: Open WebUI
# (rag_webui_image) on 127.0.0.1:rag_port only (reach it through SSH: ssh -L 3000:127.0.0.1:3000),
# its documents' vectors in the vector database (rag_vector_db: "qdrant", Qdrant's image, or
# "chroma", Chroma's server) on 127.0.0.1:rag_vector_db_port, chat from the host's inference service
# rag_chat_service and embeddings from rag_embedding_service (an engine serving /v1/embeddings, e.g.
# llama.cpp with --embeddings --pooling mean), both reached on the host itself, their keys (their
# api_key_file) read by the container from root-only files, never in its environment as Docker shows
# it. Units: gpufleet-rag-vectordb, then gpufleet-rag-webui (started after the vector database and
# the two services are ready: systemd ordering, each unit ready on its own endpoint). The deploy
# creates the first admin (rag_admin_email, the password in rag_admin_password_file on the control
# node) through Open WebUI's own sign-up while it has no account; sign-up stays off. Open WebUI's
# settings come from the inventory on every start (ENABLE_PERSISTENT_CONFIG off): rag_webui_settings
# adds Open WebUI variables (RAG_TEMPLATE, ENABLE_TITLE_GENERATION, ...). Data (accounts, chats,
# documents, vectors) lives under rag_data_dir; a host that leaves rag_hosts has the units removed and
# keeps its data.
# Beyond the host: with rag_gateway_port, the site's gateway (gateway_hosts) serves Open WebUI on that
# port over TLS (the site's certificate; its clients: gateway_allowed_sources), reaching it through a
# TLS front on the RAG host (gpufleet-rag-front, HAProxy, on inference_listen:rag_front_port, admitted
# from inference_allowed_sources: list the gateway's address there, unless the gateway is this host).
# One RAG host per site is served so (each has its own accounts and documents). None: loopback only.
rag_gateway_port = None
rag_front_port = 3443
rag_webui_image = "ghcr.io/open-webui/open-webui:v0.12.4"
rag_port = 3000
# One of: qdrant | chroma
rag_vector_db = "qdrant"
rag_vector_db_image = "qdrant/qdrant:v1.13.4"
rag_vector_db_port = 6333
rag_chat_service = None
rag_embedding_service = None
rag_admin_email = None
rag_admin_password_file = None
rag_webui_settings = {}
rag_data_dir = "/var/lib/gpufleet/rag"
rag_start_timeout = 300
