"""gpufleet operations: one module per concern, each exposing ``@deploy`` functions and its facts beside it."""

from pathlib import Path

# Files gpufleet installs on hosts as they are (scripts, units, rules) and the units it renders.
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
# Where gpufleet installs its own tools on hosts (readiness and weight checks, relay sender, ...).
TOOLS_DIR = "/usr/local/lib/gpufleet"
