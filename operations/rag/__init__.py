"""The local RAG stack: Open WebUI and a vector database wired to the fleet's own models."""
