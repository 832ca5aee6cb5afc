# gpufleet-registry-auth REGISTRY: the SHA-256 of the `auth` value root's Docker config keeps for REGISTRY
# (never the value itself), or "none". Sent inline (python3 -c) by operations/container/images.py (RegistryLogin).
import hashlib
import json
import sys

try:
    auth = json.load(open("/root/.docker/config.json"))["auths"][sys.argv[1]]["auth"]
except Exception:
    auth = ""
print(hashlib.sha256(auth.encode()).hexdigest() if auth else "none")
