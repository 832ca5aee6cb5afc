"""Container runtimes (Docker, containerd, Podman: their packages, configuration and restarts), the
images the services run (loaded or pulled, pinned, registry logins), and pruning what no service uses."""
