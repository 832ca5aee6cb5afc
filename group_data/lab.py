"""The built-in lab (inventories/lab.py): NVIDIA's toolkit repository cannot be reached here, so
the toolkit comes from a local repository of test doubles (tests/fixtures/nvidia_toolkit_double),
built by ``python -m tests.lab up`` into .lab/toolkit-repo and staged onto the hosts."""

nvidia_toolkit_source = "local-repo"
nvidia_toolkit_local_repo_src = ".lab/toolkit-repo"
