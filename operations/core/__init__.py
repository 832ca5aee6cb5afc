"""What every concern builds on: settings and their checks, errors, the remote shell, answers kept per
host (``host_memo``), apt pins and holds, JSON files, systemd's quoting, and gpufleet's own directories."""
