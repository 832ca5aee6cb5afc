#!/usr/bin/env python3
"""Write operations/driver/nvidia_generations.json: each NVIDIA PCI device id -> its chip and generation,
from the device names of pci.ids (tests/data/pci/nvidia-devices.txt: "2330  GH100 [H100 SXM5 80GB]").
The chip name's prefix gives the generation (GK Kepler ... GB Blackwell).

    python scripts/gpu-generations.py   # after refreshing tests/data/pci/nvidia-devices.txt
"""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tests" / "data" / "pci" / "nvidia-devices.txt"
OUT = REPO / "operations" / "driver" / "nvidia_generations.json"
# Chip prefixes, oldest first (NVIDIA's own code names).
GENERATIONS = [
    ("GK", "Kepler"),
    ("GM", "Maxwell"),
    ("GP", "Pascal"),
    ("GV", "Volta"),
    ("TU", "Turing"),
    ("GA", "Ampere"),
    ("AD", "Ada"),
    ("GH", "Hopper"),
    ("GB", "Blackwell"),
]


def main():
    devices = {}
    for line in SOURCE.read_text().splitlines():
        match = re.match(r"^\t([0-9a-f]{4})  ((G[KMPVAHB]|TU|AD)\d{3}\w*)\b(.*)$", line)
        if not match:
            continue
        device, chip, prefix, rest = match.groups()
        generation = dict(GENERATIONS)[prefix]
        devices[f"0x{device}"] = {"chip": chip, "name": f"{chip}{rest}".strip(), "generation": generation}
    OUT.write_text(
        json.dumps(
            {
                "source": "pci.ids 2025.06.09 (Debian trixie pci.ids 0.0~2025.06.09-1)",
                "order": [name for _, name in GENERATIONS],
                "devices": devices,
            },
            indent=0,
            sort_keys=True,
        )
        + "\n"
    )
    print(f"{OUT}: {len(devices)} devices")


if __name__ == "__main__":
    main()
