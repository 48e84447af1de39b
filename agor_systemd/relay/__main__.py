from agor_systemd.relay.program import run

run()
