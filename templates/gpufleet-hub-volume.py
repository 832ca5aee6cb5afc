# gpufleet-hub-volume DIR SOURCE_FILE: what a hub volume fetched into DIR holds, as one JSON line: its
# source (repo, commit: SOURCE_FILE's content), how many files its record lists, and whether every one
# is there at the recorded size and mtime. Sent inline (python3 -c) by operations/weights/hub.py (HubVolume).
import json
import os
import sys

d, source_file = sys.argv[1], sys.argv[2]


def load(name):
    try:
        return json.load(open(os.path.join(d, name)))
    except (OSError, ValueError):
        return None


def same(path, entry):
    try:
        s = os.stat(os.path.join(d, path))
    except OSError:
        return False
    return [s.st_size, int(s.st_mtime)] == entry[:2]


source, record = load(source_file), load(".gpufleet-staged.json") or {}
print(
    json.dumps(
        {"source": source, "files": len(record), "intact": bool(record) and all(same(p, e) for p, e in record.items())}
    )
)
