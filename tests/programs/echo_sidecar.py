"""A sidecar for the relay's tests and benchmark: says ready, then answers every NDJSON line with
{"type": "echo", "message": <the line's object>} (agor's runners answer a query with events)."""

import json
import os
import sys

print(json.dumps({"type": "ready", "pid": os.getpid()}), flush=True)
for line in sys.stdin:
    try:
        message = json.loads(line)
    except ValueError:
        continue
    if message.get("type") == "crash":
        sys.exit(3)
    sys.stdout.write(json.dumps({"type": "echo", "message": message}) + "\n")
    sys.stdout.flush()
