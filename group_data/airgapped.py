"""Hosts that reach nothing: everything comes from the offline bundle (gpufleet_bundle)."""

gpufleet_offline = True
nvidia_driver_source = "bundle"
nvidia_toolkit_source = "bundle"
