"""Every status of `execute_code`, decided from evidence, through a real MCP client and the Python API.

Each test runs real code in a real sandbox; the contract is /work/shared/spec/execute_code.md.
"""

from __future__ import annotations

import re
import time

import anyio
import pytest

from codomyrmex_sandbox import LimitAboveCapError, Sandbox, UnknownLanguageError, run_code
from codomyrmex_sandbox.excerpt import marker_line

pytestmark = pytest.mark.docker

QUICK = 10.0  # the timeout for programs that should end at once: a hang fails fast, a busy CI still passes
BASH_REPEATS = 8  # the bash runner's trailer depends on a random nonce; repeat so that a bad nonce shows up


# -- success ------------------------------------------------------------------------------------


async def test_print_succeeds_with_its_output_and_exit_code_zero(in_process):
    async with in_process() as mcp:
        result = await mcp.call({"code": "print(1)", "timeout_seconds": QUICK})

    assert result.is_error is False
    structured = result.structured_content
    assert structured is not None
    assert structured["status"] == "success"
    assert structured["stdout"] == "1\n"
    assert structured["stderr"] == ""
    assert structured["exit_code"] == 0
    assert structured["signal"] is None
    assert structured["stdout_truncated"] is False
    assert structured["stderr_truncated"] is False
    assert structured["return_value"] is None
    assert structured["language"] == "python"
    assert re.fullmatch(r"[0-9a-f]{32}", structured["execution_id"])
    assert structured["duration_ms"] > 0


async def test_text_content_starts_with_the_status_line_then_the_output(in_process):
    async with in_process() as mcp:
        result = await mcp.call({"code": "print('hello')", "timeout_seconds": QUICK})

    text = result.content[0].text
    assert text.startswith("status: success")
    assert "hello" in text


async def test_each_execution_gets_a_unique_id(in_process):
    async with in_process() as mcp:
        first = await mcp.run("print(1)", timeout_seconds=QUICK)
        second = await mcp.run("print(1)", timeout_seconds=QUICK)

    assert first["execution_id"] != second["execution_id"]


# -- error --------------------------------------------------------------------------------------


async def test_an_uncaught_exception_is_an_error_with_its_traceback_on_stderr(in_process):
    async with in_process() as mcp:
        result = await mcp.run("1/0", timeout_seconds=QUICK)

    assert result["status"] == "error"
    assert result["exit_code"] == 1
    assert result["signal"] is None
    assert "Traceback (most recent call last)" in result["stderr"]
    assert "ZeroDivisionError: division by zero" in result["stderr"]
    assert 'File "main.py", line 1' in result["stderr"]


async def test_sys_exit_three_is_an_error_with_exit_code_three(in_process):
    async with in_process() as mcp:
        result = await mcp.run("import sys\nsys.exit(3)", timeout_seconds=QUICK)

    assert result["status"] == "error"
    assert result["exit_code"] == 3
    assert result["signal"] is None


async def test_a_syntax_error_is_an_error_that_names_the_line(in_process):
    async with in_process() as mcp:
        result = await mcp.run("def f(:\n    pass", timeout_seconds=QUICK)

    assert result["status"] == "error"
    assert result["exit_code"] == 1
    assert "SyntaxError" in result["stderr"]
    assert 'File "main.py", line 1' in result["stderr"]


@pytest.mark.parametrize(
    "code",
    [pytest.param("1/0", id="exception"), pytest.param("def f(:\n    pass", id="syntax-error")],
)
async def test_errors_show_only_the_programs_own_frames_not_the_runners(sandbox: Sandbox, code):
    # "print it as Python would": a user's traceback must not point into the runner or into ast.py.
    result = await sandbox.execute(code, timeout_seconds=QUICK)

    assert result.status == "error"
    assert "/opt/codomyrmex" not in result.stderr
    assert "ast.py" not in result.stderr, f"the runner's own frames leak into the traceback:\n{result.stderr}"


async def test_sys_exit_137_is_an_error_not_a_kill(in_process):
    async with in_process() as mcp:
        result = await mcp.run("import sys\nsys.exit(137)", timeout_seconds=QUICK)

    assert result["status"] == "error"
    assert result["exit_code"] == 137
    assert result["signal"] is None


async def test_reading_input_without_stdin_meets_eof_at_once(in_process):
    start = time.monotonic()
    async with in_process() as mcp:
        result = await mcp.run("input()", timeout_seconds=3)
    elapsed = time.monotonic() - start

    assert result["status"] == "error"
    assert "EOFError" in result["stderr"]
    assert elapsed < 3


# -- limits ------------------------------------------------------------------------------------


async def test_an_endless_loop_times_out_and_the_sandbox_is_killed(in_process):
    start = time.monotonic()
    async with in_process() as mcp:
        result = await mcp.run("while True:\n    pass", timeout_seconds=1)
    elapsed = time.monotonic() - start

    assert result["status"] == "timeout"
    assert result["signal"] == "SIGKILL"
    assert result["exit_code"] is None
    assert 0.9 <= result["duration_ms"] / 1000 < 3
    assert elapsed < 5


async def test_output_printed_before_a_timeout_is_kept(in_process):
    async with in_process() as mcp:
        result = await mcp.run("import time\nprint('before', flush=True)\ntime.sleep(30)", timeout_seconds=1)

    assert result["status"] == "timeout"
    assert result["stdout"] == "before\n"


async def test_allocating_past_the_memory_limit_is_a_memory_limit(in_process):
    async with in_process() as mcp:
        result = await mcp.run(
            "data = b'x' * (400 * 1024 * 1024)\nprint(len(data))", memory_mb=64, timeout_seconds=QUICK
        )

    assert result["status"] == "memory_limit"
    assert result["exit_code"] is None
    assert result["stdout"] == ""


async def test_flooding_stdout_is_an_output_limit_with_output_kept_up_to_the_cap(in_process, settings):
    start = time.monotonic()
    async with in_process() as mcp:
        result = await mcp.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout_seconds=QUICK)
    elapsed = time.monotonic() - start

    assert result["status"] == "output_limit"
    assert result["stdout_truncated"] is True
    assert result["stderr_truncated"] is False
    # The result carries the head and tail of what was kept up to the cap (see test_model_sized_output.py).
    kept = result["stdout"].replace(marker_line(result["stdout_omitted_bytes"], "stdout"), "")
    assert len(kept.encode()) + result["stdout_omitted_bytes"] == settings.max_output_bytes == 1024 * 1024
    assert set(kept) == {"x"}
    assert result["exit_code"] is None
    assert elapsed < 5  # killed at the cap, not at the timeout


async def test_flooding_stderr_is_an_output_limit_too(sandbox: Sandbox, settings):
    result = await sandbox.execute("import sys\nwhile True:\n    sys.stderr.write('e' * 65536)", timeout_seconds=QUICK)

    assert result.status == "output_limit"
    assert result.stderr_truncated is True
    assert result.stdout_truncated is False
    assert len(result.stderr.encode()) == settings.max_output_bytes


# -- killed -------------------------------------------------------------------------------------


async def test_a_program_that_sigkills_itself_is_killed_with_no_exit_code(in_process):
    async with in_process() as mcp:
        result = await mcp.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", timeout_seconds=QUICK)

    assert result["status"] == "killed"
    assert result["signal"] == "SIGKILL"
    assert result["exit_code"] is None


async def test_killed_through_the_python_api_too(sandbox: Sandbox):
    result = await sandbox.execute("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)", timeout_seconds=QUICK)

    assert result.status == "killed"
    assert result.signal == "SIGTERM"
    assert result.exit_code is None


# -- Python's return value ----------------------------------------------------------------------


async def test_a_final_expression_is_the_return_value(in_process):
    async with in_process() as mcp:
        result = await mcp.run("x = 6*7\nx", timeout_seconds=QUICK)

    assert result["status"] == "success"
    assert result["return_value"] == "42"
    assert result["stdout"] == ""


async def test_a_final_print_has_no_return_value(in_process):
    async with in_process() as mcp:
        result = await mcp.run("print(1)", timeout_seconds=QUICK)

    assert result["return_value"] is None


async def test_printing_and_a_final_expression_leave_stdout_unchanged(in_process):
    async with in_process() as mcp:
        result = await mcp.call({"code": "print('hi')\n'a' + 'b'", "timeout_seconds": QUICK})

    structured = result.structured_content
    assert structured is not None
    assert structured["stdout"] == "hi\n"
    assert structured["return_value"] == "'ab'"
    assert "return value: 'ab'" in result.content[0].text


async def test_a_failing_final_expression_has_no_return_value(sandbox: Sandbox):
    result = await sandbox.execute("x = 1\nx / 0", timeout_seconds=QUICK)

    assert result.status == "error"
    assert result.return_value is None


# -- stdin and output decoding ------------------------------------------------------------------


async def test_stdin_is_delivered_to_the_program(in_process):
    async with in_process() as mcp:
        result = await mcp.run("import sys\nprint(sys.stdin.read())", stdin="abc", timeout_seconds=QUICK)

    assert result["status"] == "success"
    assert result["stdout"] == "abc\n"


async def test_stdin_of_one_mebibyte_arrives_whole(sandbox: Sandbox, settings):
    stdin = "y" * settings.max_stdin_bytes
    result = await sandbox.execute(
        "import sys\nprint(len(sys.stdin.buffer.read()))", stdin=stdin, timeout_seconds=QUICK
    )

    assert result.stdout == f"{settings.max_stdin_bytes}\n"


async def test_output_that_is_not_utf8_is_decoded_with_replacement(sandbox: Sandbox):
    result = await sandbox.execute(
        "import sys\nsys.stdout.buffer.write(b'a\\xffb\\n')\nprint('\\u00e9')", timeout_seconds=QUICK
    )

    assert result.stdout == "a\ufffdb\n\u00e9\n"


# -- javascript and bash ------------------------------------------------------------------------


async def test_javascript_console_log_succeeds(in_process):
    async with in_process() as mcp:
        result = await mcp.run("console.log('hi from node')", language="javascript", timeout_seconds=QUICK)

    assert result["status"] == "success"
    assert result["stdout"] == "hi from node\n"
    assert result["exit_code"] == 0
    assert result["language"] == "javascript"


async def test_javascript_process_exit_three_is_an_error(in_process):
    async with in_process() as mcp:
        result = await mcp.run("process.exit(3)", language="javascript", timeout_seconds=QUICK)

    assert result["status"] == "error"
    assert result["exit_code"] == 3


async def test_javascript_throw_is_an_error_with_the_message_on_stderr(in_process):
    async with in_process() as mcp:
        result = await mcp.run("throw new Error('boom')", language="javascript", timeout_seconds=QUICK)

    assert result["status"] == "error"
    assert result["exit_code"] == 1
    assert "Error: boom" in result["stderr"]


async def test_javascript_reads_stdin(in_process):
    code = "let s = ''; process.stdin.on('data', d => s += d).on('end', () => console.log('got ' + s))"
    async with in_process() as mcp:
        result = await mcp.run(code, language="javascript", stdin="abc", timeout_seconds=QUICK)

    assert result["stdout"] == "got abc\n"


async def test_bash_echo_prints_exactly_its_output_every_time(sandbox: Sandbox):
    results = await run_many(sandbox, "echo hi", language="bash", timeout_seconds=QUICK)

    leaked = [r.stdout for r in results if r.stdout != "hi\n"]
    assert not leaked, f"{len(leaked)} of {BASH_REPEATS} runs show the runner's exit trailer in stdout: {leaked}"
    assert [r.status for r in results] == ["success"] * BASH_REPEATS


async def test_bash_exit_four_is_an_error(in_process):
    async with in_process() as mcp:
        result = await mcp.run("exit 4", language="bash", timeout_seconds=QUICK)

    assert result["status"] == "error"
    assert result["exit_code"] == 4


async def test_bash_exit_137_is_an_error_not_a_kill_every_time(sandbox: Sandbox):
    results = await run_many(sandbox, "exit 137", language="bash", timeout_seconds=QUICK)

    outcomes = [(r.status, r.exit_code, r.signal) for r in results]
    wrong = [outcome for outcome in outcomes if outcome != ("error", 137, None)]
    assert not wrong, f"{len(wrong)} of {BASH_REPEATS} `exit 137` runs were not error 137: {wrong}"


async def test_bash_reads_stdin_with_read(in_process):
    async with in_process() as mcp:
        result = await mcp.run('read -r line\necho "got $line"', language="bash", stdin="abc\n", timeout_seconds=QUICK)

    assert result["status"] == "success"
    assert result["stdout"].startswith("got abc\n")


async def run_many(sandbox: Sandbox, code: str, **options):
    results = [None] * BASH_REPEATS

    async def one(index: int) -> None:
        results[index] = await sandbox.execute(code, **options)

    async with anyio.create_task_group() as tg:
        for index in range(BASH_REPEATS):
            tg.start_soon(one, index)
    return results


@pytest.mark.parametrize(
    ("language", "code", "pattern"),
    [
        ("python", "print(1)", r"python 3\.\d+\.\d+"),
        ("javascript", "console.log(1)", r"node \d+\.\d+\.\d+"),
        ("bash", "echo 1", r"bash \d+\.\d+\.\d+"),
    ],
)
async def test_the_runtime_field_names_the_language_and_its_version(in_process, language, code, pattern):
    async with in_process() as mcp:
        result = await mcp.run(code, language=language, timeout_seconds=QUICK)

    assert result["language"] == language
    assert re.fullmatch(pattern, result["runtime"]), result["runtime"]


# -- calls that never ran -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        pytest.param({"code": "print(1)", "language": "cobol"}, ["cobol", "python"], id="unknown-language"),
        pytest.param({"code": "print(1)", "timeout_seconds": 301}, ["timeout_seconds", "300"], id="timeout-above-cap"),
        pytest.param({"code": "print(1)", "memory_mb": 4096}, ["memory_mb", "2048"], id="memory-above-cap"),
        pytest.param({"code": "print(1)", "bogus": 1}, ["bogus"], id="unknown-argument"),
        pytest.param({"code": "print(1)\x00"}, ["NUL"], id="nul-in-code"),
        pytest.param({"code": "   "}, ["empty"], id="empty-code"),
        pytest.param({"language": "python"}, ["code"], id="missing-code"),
    ],
)
async def test_a_call_that_cannot_run_is_an_error_result_and_the_server_keeps_serving(in_process, arguments, fragments):
    async with in_process() as mcp:
        result = await mcp.call(arguments)
        after = await mcp.run("print('still here')", timeout_seconds=QUICK)

    assert result.is_error is True
    assert result.structured_content is None
    text = result.content[0].text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert after["status"] == "success"
    assert after["stdout"] == "still here\n"


async def test_the_python_api_raises_for_an_unknown_language(sandbox: Sandbox):
    with pytest.raises(UnknownLanguageError, match="cobol"):
        await sandbox.execute("print(1)", language="cobol")


async def test_the_python_api_raises_for_a_timeout_above_the_cap(sandbox: Sandbox):
    with pytest.raises(LimitAboveCapError, match="300"):
        await sandbox.execute("print(1)", timeout_seconds=301)


def test_run_code_runs_once_synchronously(settings):
    result = run_code("print(2 + 2)", timeout_seconds=QUICK, settings=settings)

    assert result.status == "success"
    assert result.stdout == "4\n"
