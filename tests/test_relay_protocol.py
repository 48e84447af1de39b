"""agor-relay's Sans-I/O core: frames, tokens, the per-IP lockout, a slow reader's queue, the replay buffer."""

from __future__ import annotations

import json

import pytest

from agor_systemd.relay.protocol import (
    FailureLimiter,
    FrameError,
    Outbound,
    OutQueue,
    ReplayBuffer,
    bearer_token,
    error_frame,
    parse_command,
    payload_field,
    sidecar_restart_delay_s,
    state_sync,
    token_digest,
    token_matches,
)


def test_a_controller_frame_is_parsed_with_its_id():
    command = parse_command('{"id": "7", "type": "pty_write", "payload": {"id": "p1", "data": "ls\\n"}}')
    assert (command.id, command.type, command.payload) == ("7", "pty_write", {"id": "p1", "data": "ls\n"})
    assert parse_command('{"id": 8, "type": "ping"}').id == "8"  # agor's ids may be numbers


@pytest.mark.parametrize(
    ("frame", "message", "command_id"),
    [
        ("not json", "not JSON", None),
        ("[1, 2]", "a frame must be a JSON object", None),
        ('{"id": "1"}', "`type` is missing", "1"),
        ('{"id": "2", "type": "rm_rf"}', "unknown type 'rm_rf'", "2"),
        ('{"id": {}, "type": "ping"}', "`id` must be a string or a number", None),
        (b"\x00\x01", "binary frames are not part of the protocol", None),
    ],
)
def test_a_bad_frame_is_answered_with_an_error_naming_its_command(frame, message, command_id):
    with pytest.raises(FrameError, match=message.replace("[", r"\[")) as caught:
        parse_command(frame)
    assert caught.value.command_id == command_id


def test_payload_fields_are_typed_and_defaulted():
    command = parse_command('{"id": "1", "type": "pty_resize", "payload": {"id": "p", "cols": 100, "rows": true}}')
    assert payload_field(command, "cols", int) == 100
    assert payload_field(command, "shell", str, "/bin/bash") == "/bin/bash"
    with pytest.raises(FrameError, match=r"payload\.rows has the wrong type"):
        payload_field(command, "rows", int)  # a JSON true is not a row count
    with pytest.raises(FrameError, match=r"payload\.data is missing"):
        payload_field(command, "data", str)


def test_outbound_frames_are_agors_shape():
    assert json.loads(Outbound("pty_data", "p1", "hi").text()) == {
        "type": "pty_data",
        "sessionId": "p1",
        "payload": "hi",
    }
    assert json.loads(Outbound("pong").text()) == {"type": "pong"}
    assert json.loads(error_frame("bad", "3").text()) == {
        "type": "error",
        "payload": {"commandId": "3", "message": "bad"},
    }


def test_the_token_is_read_from_a_bearer_header_only():
    assert bearer_token("Bearer s3cret") == "s3cret"
    assert bearer_token("bearer s3cret ") == "s3cret"
    assert bearer_token("Basic czNjcmV0") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_token_comparison():
    expected = token_digest("s3cret")
    assert token_matches("s3cret", expected)
    assert not token_matches("s3cre", expected)
    assert not token_matches("s3cret ", expected)
    assert not token_matches(None, expected)
    assert not token_matches(None, token_digest(""))  # no header never matches, not even an empty token


def test_ten_failures_lock_out_that_ip_only_for_the_rest_of_the_window():
    limiter = FailureLimiter(max_failures=10, window_s=300)
    for i in range(9):
        limiter.failed("127.0.0.2", 100.0 + i)
    assert limiter.locked_for("127.0.0.2", 109.0) == 0
    limiter.failed("127.0.0.2", 109.0)
    assert limiter.locked_for("127.0.0.2", 110.0) == pytest.approx(290.0)  # until the first failure ages out
    assert limiter.locked_for("127.0.0.3", 110.0) == 0  # another IP is not slowed
    assert limiter.locked_for("127.0.0.2", 400.5) == 0  # 100.0 left the window: 9 recent failures


def test_a_thousand_failures_keep_one_ips_memory_bounded():
    limiter = FailureLimiter(max_failures=10, window_s=300, max_ips=4)
    for i in range(1000):
        limiter.failed("127.0.0.2", float(i) / 100)
    assert len(limiter._failures["127.0.0.2"]) == 10
    for n in range(10):
        limiter.failed(f"10.0.0.{n}", 20.0)
    assert len(limiter._failures) == 4  # the IPs failing longest ago are forgotten first


def test_the_queue_coalesces_terminal_output_of_one_pty():
    queue = OutQueue(limit_bytes=10_000)
    for chunk in ("a", "b", "c"):
        assert queue.push(Outbound("pty_data", "p1", chunk))
    queue.push(Outbound("pty_data", "p2", "x"))
    queue.push(Outbound("pty_data", "p1", "d"))
    frames = queue.drain()
    assert [(f.session_id, f.payload) for f in frames] == [("p1", "abc"), ("p2", "x"), ("p1", "d")]
    assert queue.bytes == 0


def test_a_queue_over_its_limit_tells_the_caller_and_keeps_every_frame():
    queue = OutQueue(limit_bytes=1000)
    message = Outbound("sidecar_message", payload={"text": "x" * 600})
    assert queue.push(message)
    assert not queue.push(Outbound("sidecar_message", payload={"text": "y" * 600}))
    assert len(queue.drain()) == 2  # nothing dropped: the session replays them


def test_pop_keeps_the_byte_count():
    queue = OutQueue(limit_bytes=1000)
    queue.push(Outbound("pong"))
    queue.push(Outbound("pty_data", "p", "abc"))
    assert queue.pop() == Outbound("pong")
    assert queue.pop() == Outbound("pty_data", "p", "abc")
    assert queue.pop() is None and queue.bytes == 0


def test_the_replay_buffer_drops_oldest_first_and_counts_every_loss():
    buffer = ReplayBuffer(limit_bytes=500)
    sent = [Outbound("sidecar_message", payload={"n": i, "pad": "x" * 80}) for i in range(10)]
    buffer.extend(sent)
    frames, lost = buffer.take()
    kept = 500 // sent[0].size()
    assert [f.payload["n"] for f in frames] == list(range(10 - kept, 10))
    assert lost == {"sidecar_message": 10 - kept}
    assert buffer.take() == ([], {})


def test_state_sync_says_what_is_alive_and_what_follows():
    frame = json.loads(state_sync("s1", [{"id": "p1", "alive": True}], "running", 3, {"pty_data": 2}).text())
    assert frame == {
        "type": "state_sync",
        "payload": {
            "session": "s1",
            "ptys": [{"id": "p1", "alive": True}],
            "sidecar": "running",
            "replayed": 3,
            "lost": {"pty_data": 2},
        },
    }


def test_the_sidecars_restart_schedule_is_agor_sidecars():
    delays = [sidecar_restart_delay_s(k, 1.0, 30.0, 5) for k in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, None]
    assert sidecar_restart_delay_s(3, 1.0, 3.0, 10) == 3.0
