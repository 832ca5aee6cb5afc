# The two commands of the README. Both do all the set-up they need on a fresh Debian machine (as root).
PY := .venv/bin/python

.PHONY: demo test unit lint lab-down

# Bring up the lab, deploy the full stack to it, check it host by host and show a summary.
demo:
	bash scripts/bootstrap.sh
	$(PY) -m tests.lab up --hosts 2 --airgapped 1 --proxmox 1 --connected 1 --ubuntu 1
	.venv/bin/pyinfra -y inventories/lab.py deploy.py
	$(PY) -m pytest -p no:cacheprovider tests/checks --hosts=$$($(PY) -m tests.lab hosts) --ssh-config=.lab/ssh_config --sudo -v
	$(PY) -m tests.lab summary

# Unit tests, then the end-to-end tests on a fresh lab (removed at the end).
test:
	bash scripts/bootstrap.sh
	$(PY) -m pytest

unit:
	$(PY) -m pytest -m "not e2e" tests/unit

# ruff's lint and format check (settings in pyproject.toml); `.venv/bin/ruff format .` fixes the format.
lint:
	bash scripts/bootstrap.sh
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

lab-down:
	$(PY) -m tests.lab down
