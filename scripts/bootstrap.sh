#!/usr/bin/env bash
# Prepare this machine to run the lab: Debian packages, a running dockerd, the venv.
# Idempotent: every step checks before it acts. Prints one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for bin_pkg in docker:docker.io dockerd:docker.io debootstrap:debootstrap zstd:zstd \
               iptables:iptables ssh:openssh-client ssh-keygen:openssh-client \
               dpkg-scanpackages:dpkg-dev rsync:rsync haproxy:haproxy nft:nftables \
               chromium:chromium chromedriver:chromium-driver; do
  bin=${bin_pkg%%:*} pkg=${bin_pkg#*:}
  command -v "$bin" >/dev/null 2>&1 || need_apt+=("$pkg")
done
# The machine may have a docker client without the engine.
[ -x /usr/sbin/dockerd ] || need_apt+=(docker.io)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need_apt[@]}" | sort -u) >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "bootstrap: starting dockerd"
  mkdir -p /var/log
  nohup /usr/sbin/dockerd >/var/log/gpufleet-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "bootstrap: dockerd did not start, see /var/log/gpufleet-dockerd.log"; exit 1; }
fi

if [ ! -x .venv/bin/pyinfra ] || ! cmp -s requirements.txt .venv/.requirements; then
  echo "bootstrap: creating .venv from requirements.txt"
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
  cp requirements.txt .venv/.requirements
fi
# promtool (Prometheus' own checker: the unit tests run gpufleet's alert rules through it), taken out
# of Debian's prometheus package into .venv/bin: no Prometheus is installed or started on this machine.
if [ ! -x .venv/bin/promtool ]; then
  echo "bootstrap: promtool from Debian's prometheus package into .venv/bin"
  work=$(mktemp -d)
  (cd "$work" && { apt-get download -qq prometheus 2>/dev/null || { apt-get update -qq && apt-get download -qq prometheus; }; })
  dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -xO ./usr/bin/promtool > .venv/bin/promtool.new
  chmod 755 .venv/bin/promtool.new && mv .venv/bin/promtool.new .venv/bin/promtool
  rm -rf "$work"
fi
echo "bootstrap: ready (docker $(docker version --format '{{.Server.Version}}'), $(.venv/bin/pyinfra --version))"
