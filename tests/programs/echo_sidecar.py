"""A sidecar for the relay's tests and benchmark: says ready, then answers every NDJSON line with
{"type": "echo", "message": <the line's object>} (agor's runners answer a query with events). A query
whose prompt is "crash" makes it exit with status 3; "flood:N:MBPS" answers with N events of 1 KiB
at about MBPS MB/s first."""

import json
import os
import sys
import time

print(json.dumps({"type": "ready", "pid": os.getpid()}), flush=True)
for line in sys.stdin:
    try:
        message = json.loads(line)
    except ValueError:
        continue
    prompt = str(message.get("prompt", ""))
    if prompt == "crash":
        sys.exit(3)
    if prompt.startswith("flood:"):  # flood:N:MBPS: N events of 1 KiB at about MBPS MB/s
        count, rate = (int(word) for word in prompt[6:].split(":"))
        for i in range(count):
            sys.stdout.write(json.dumps({"type": "event", "n": i, "text": "x" * 1000}) + "\n")
            if i % 100 == 99:
                sys.stdout.flush()
                time.sleep(0.1 / rate)
    sys.stdout.write(json.dumps({"type": "echo", "message": message}) + "\n")
    sys.stdout.flush()
