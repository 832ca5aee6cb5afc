"""The gpufleet lab: systemd-booted Debian hosts in containers, reached over real SSH.

Used by the README's demo and by the end-to-end tests. See ``python -m tests.lab --help``.
"""
