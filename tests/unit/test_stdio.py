"""The hardened stdio reader and the answers to malformed lines, without a subprocess."""

from __future__ import annotations

import io

import mcp_types as types
import pytest

from codomyrmex_sandbox import FakeBackend, Sandbox, Settings
from codomyrmex_sandbox.stdio import _describe_malformed, _has_invalid_id, _leading_id, _StdinLines, max_message_chars


def test_the_message_bound_is_six_times_the_largest_code_stdin_and_files_plus_room_for_the_rest():
    settings = Settings.load(backend="fake", language_limits={"bash": {"max_code_bytes": 4 * 1024 * 1024}})
    sandbox = Sandbox(settings, backend=FakeBackend())
    files = 4 * -(-16 * 1024 * 1024 // 3) + 64 * 8192  # base64 of the upload cap, and each file's fields
    assert max_message_chars(sandbox) == 6 * (4 * 1024 * 1024 + 1024 * 1024) + files + 65_536


async def test_over_long_lines_and_invalid_ids_are_set_aside_and_answered_and_the_rest_read():
    lines = [
        '{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n',
        '{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"code": "' + "x" * 500 + '"}}\n',
        '{"jsonrpc": "2.0", "id": true, "method": "ping"}\n',
        '{"jsonrpc": "2.0", "id": 2, "method": "ping"}\n',
    ]
    reader = _StdinLines(io.StringIO("".join(lines)), max_chars=200)
    assert await reader.readline() == lines[0]
    assert await reader.readline() == lines[3]
    assert await reader.readline() == ""  # end of input
    oversized, invalid = reader.rejected.receive_nowait(), reader.rejected.receive_nowait()
    assert oversized.id == 7
    assert oversized.error.code == types.INVALID_REQUEST
    assert f"{len(lines[1])} characters long, over this server's limit of 200" in oversized.error.message
    assert invalid.id is None
    assert invalid.error.message == "invalid request: id must be a string or a number"


@pytest.mark.parametrize(
    ("line", "invalid"),
    [
        ('{"id": 1}', False),
        ('{"id": "a"}', False),
        ('{"id": true}', True),
        ('{"id": 1.5}', True),
        ('{"id": null}', True),
        ('{"\\u0069d": [1]}', True),
        ('{"method": "x"}', False),
        ("not json", False),
    ],
)
def test_an_id_is_valid_only_as_a_string_or_an_integer(line, invalid):
    assert _has_invalid_id(line) is invalid


@pytest.mark.parametrize(
    ("head", "request_id"),
    [
        ('{"jsonrpc": "2.0", "id": 42, "params": {"code": "', 42),
        ('{"id" : "abc\\"d", "method"', 'abc"d'),
        ('{"id": 1.5, "method"', None),
        ('{"params": {"code": "', None),
    ],
)
def test_the_id_of_an_over_long_line_is_found_in_its_start(head, request_id):
    assert _leading_id(head) == request_id


def test_a_line_that_does_not_parse_is_a_parse_error_and_one_that_is_not_json_rpc_keeps_its_id():
    def failure(line: str) -> Exception:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - whatever the SDK's parser raises
            types.jsonrpc_message_adapter.validate_json(line, by_name=False)
        return caught.value

    request_id, code, message = _describe_malformed(failure("{not json"))
    assert (request_id, code) == (None, types.PARSE_ERROR)
    assert message.startswith("parse error: ")
    request_id, code, message = _describe_malformed(failure('{"jsonrpc": "2.0", "id": 3, "method": 5}'))
    assert (request_id, code) == (3, types.INVALID_REQUEST)
    assert message.startswith("invalid request: ")
