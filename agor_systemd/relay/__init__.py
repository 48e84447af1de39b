"""agor-relay: a TLS WebSocket relay for agor's controller on another machine (docs/relay.md).

`protocol` (the wire format and the relay's decisions, pure), `tls` (contexts, certificates, pins),
`sessions` (PTYs and the sidecar under the launcher program), `server` (websockets), `client`
(connect with the pin enforced in the handshake), `program` (the agor-relay command), `units`.
"""
