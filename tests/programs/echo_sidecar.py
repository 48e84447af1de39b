"""A sidecar for the relay's tests and benchmark: says ready, then answers every NDJSON line with
{"type": "echo", "message": <the line's object>} (agor's runners answer a query with events); a query
whose prompt is "crash" makes it exit with status 3, "flood:N" answers with N events of 1 KiB."""

import json
import os
import sys

print(json.dumps({"type": "ready", "pid": os.getpid()}), flush=True)
for line in sys.stdin:
    try:
        message = json.loads(line)
    except ValueError:
        continue
    prompt = str(message.get("prompt", ""))
    if prompt == "crash":
        sys.exit(3)
    if prompt.startswith("flood:"):  # flood:N: N events of 1 KiB, as fast as the pipe takes them
        for i in range(int(prompt[6:])):
            sys.stdout.write(json.dumps({"type": "event", "n": i, "text": "x" * 1000}) + "\n")
    sys.stdout.write(json.dumps({"type": "echo", "message": message}) + "\n")
    sys.stdout.flush()
