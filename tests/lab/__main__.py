"""python -m tests.lab up|down|status|ssh|image — manage the gpufleet lab."""

import argparse
import os
import sys

from . import hosts, image, summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start lab hosts (reuses running ones)")
    up.add_argument("--hosts", type=int, default=2, help="connected hosts (default 2)")
    up.add_argument("--airgapped", type=int, default=1, help="air-gapped hosts (default 1)")
    up.add_argument(
        "--proxmox", type=int, default=1, help="Proxmox VE host doubles, each with one LXC guest host (default 1)"
    )
    up.add_argument(
        "--ubuntu",
        type=int,
        default=1,
        help="Ubuntu-shaped hosts (Ubuntu 24.04 facts and archive: test doubles) (default 1)",
    )
    up.add_argument(
        "--connected",
        type=int,
        default=1,
        help="hosts deployed with no bundle from the site's registry and hub on lab-svc-1 (default 1)",
    )
    sub.add_parser("down", help="remove all lab hosts, volumes, networks and firewall rules")
    sub.add_parser("status", help="list lab hosts")
    sub.add_parser("image", help="build or import the host image only")
    sub.add_parser("hosts", help="print the lab hosts as testinfra's --hosts value")
    sub.add_parser("summary", help="one line per host: GPUs, Docker, runtimes, NVIDIA packages")
    ssh = sub.add_parser("ssh", help="open a shell on a lab host")
    ssh.add_argument("name")
    ssh.add_argument("cmd", nargs="*")
    args = parser.parse_args(argv)

    if args.command == "up":
        hosts.up(
            count=args.hosts,
            airgapped=args.airgapped,
            proxmox=args.proxmox,
            connected=args.connected,
            ubuntu=args.ubuntu,
        )
        args.command = "status"
    if args.command == "status":
        for row in hosts.status():
            gap = "air-gapped" if row["airgapped"] else "connected"
            print(f"{row['name']:<12} 127.0.0.1:{row['port']:<6} {row['address']:<15} {gap:<10} {row['state']}")
    elif args.command == "hosts":
        print(",".join(f"ssh://{row['name']}" for row in hosts.deployed()))
    elif args.command == "summary":
        print(summary.table(hosts.deployed()))
    elif args.command == "down":
        hosts.down()
    elif args.command == "image":
        print(image.ensure_image())
    elif args.command == "ssh":
        os.execvp("ssh", ["ssh", "-F", str(hosts.SSH_CONFIG), args.name, *args.cmd])
    return 0


if __name__ == "__main__":
    sys.exit(main())
