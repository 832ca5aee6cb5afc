"""
The bundle command line (on the control node, or the connected machine that builds bundles)::

    python -m operations.offline.bundle build bundle.yaml --out /media/bundle [--sign-key ~/.ssh/id_ed25519]
    python -m operations.offline.bundle verify /media/bundle [--rehash] [--signers allowed_signers]
"""

import argparse
import subprocess
import sys

from operations.core.errors import ConfigError
from operations.offline.bundle.builder import build
from operations.offline.bundle.manifest import check_signature, verify


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m operations.offline.bundle", description="Build or verify a gpufleet offline bundle."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build or update a bundle from a YAML description")
    build_cmd.add_argument("spec")
    build_cmd.add_argument("--out", required=True)
    build_cmd.add_argument("--sign-key", help="SSH private key to sign the manifest with")
    verify_cmd = sub.add_parser("verify", help="check a bundle's files against its manifest")
    verify_cmd.add_argument("bundle")
    verify_cmd.add_argument("--rehash", action="store_true", help="hash every file, not only changed ones")
    verify_cmd.add_argument("--signers", help="an allowed_signers file: also check the manifest's signature")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build(args.spec, args.out, sign_key=args.sign_key)
        else:
            signer = check_signature(args.bundle, args.signers) if args.signers else None
            manifest = verify(args.bundle, rehash=args.rehash)
            print(
                f"{args.bundle}: {len(manifest['files'])} files intact"
                + (f", manifest signed by {signer}" if signer else "")
            )
    except (ConfigError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
