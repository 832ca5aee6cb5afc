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

# --- docker_ (container engine) ----------------------------------------------------------
# apt packages of the engine (Debian/Ubuntu's own docker.io by default).
docker_packages = ["docker.io"]
# Container log rotation merged into /etc/docker/daemon.json (json-file driver).
docker_log_max_size = "50m"
docker_log_max_file = 3
# More daemon.json keys to merge; keys already in the file and not named here are kept.
docker_daemon_settings = {}
