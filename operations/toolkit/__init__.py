"""The NVIDIA Container Toolkit: installed, pinned, its runtime configured for the container runtime
(``nvidia-ctk runtime configure``), CDI, /dev/char links, and a GPU container run as the proof."""
