"""The NVIDIA driver: what a host has (``devices``, ``facts``), which packages to install for it (``plan``,
pure), the deploy that installs, pins, holds and checks it (``install``), and the CUDA/driver gate."""
