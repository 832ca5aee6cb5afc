# gpufleet-unpack-wheels WHEELS_DIR SITE: unpack every wheel of WHEELS_DIR into SITE (pure-Python wheels
# need nothing more). Sent inline (python3 -c) by operations/weights/hub.py (unpacked).
import pathlib
import sys
import zipfile

wheels, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for wheel in sorted(wheels.glob("*.whl")):
    zipfile.ZipFile(wheel).extractall(site)
