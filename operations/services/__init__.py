"""Inference services (vLLM, TGI, Ollama, llama.cpp) as systemd-managed containers: each engine's
profile and command line (``engines``), units (``inference``), secret files, the services' own
accounts, the authenticating proxy and the nftables firewall in front of them."""
