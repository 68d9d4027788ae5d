"""Red-team round 1, finding 6: the server survives the engine going away, and serves again when it is back.

With the engine stopped under a running stdio server, the next call rightly said "lost the Docker
engine ... start the Docker engine", but the server then exited: the background removal of warm
sandboxes raised out of the backend's task group, and the client's next call got "Connection
closed". Now upkeep never takes the server down: while the engine is away calls fail fast with the
clear message, and once it is back the same server reconnects, sweeps what the old engine left,
refills its warm pool and serves.
"""

from __future__ import annotations

import time

import anyio
import pytest

from tests.support import control_engine, process_alive, text_of

# What the server offers with sessions on (the default).
TOOLS = ["execute_code", "create_session", "close_session", "list_sessions"]

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("host_is_clean")]

FAIL_FAST_SECONDS = 3.0


async def test_the_same_server_fails_fast_while_the_engine_is_away_and_serves_again_once_it_is_back(
    launcher, engine, measure
):
    async with launcher() as server:
        assert (await server.run("print('before')"))["stdout"] == "before\n"
        await engine.wait_for_warm_pool(server.pid)

        await anyio.to_thread.run_sync(control_engine, "stop")
        try:
            refusals = []
            for language, code in (("python", "print(1)"), ("javascript", "console.log(1)"), ("bash", "echo 1")):
                start = time.monotonic()
                result = await server.call({"code": code, "language": language})
                refusals.append((time.monotonic() - start, result))
            listed = await server.client.list_tools()
            alive_while_away = process_alive(server.pid)
        finally:
            await anyio.to_thread.run_sync(control_engine, "start")
        back = time.monotonic()

        for took, result in refusals:
            assert result.is_error, result
            assert "Docker engine" in text_of(result) and "start the Docker engine" in text_of(result), text_of(result)
            assert took < FAIL_FAST_SECONDS, f"a call with the engine away took {took:.2f} s"
        measure("slowest_refusal_while_away_seconds", round(max(took for took, _ in refusals), 3))
        assert alive_while_away
        assert [tool.name for tool in listed.tools] == TOOLS

        # The same server, no restart: it reconnects by itself and serves again.
        while True:
            result = await server.call({"code": "print('back')"})
            if not result.is_error:
                break
            assert time.monotonic() - back < 30, f"still refused 30 s after the engine came back: {text_of(result)}"
            await anyio.sleep(0.2)
        measure("first_result_after_engine_back_seconds", round(time.monotonic() - back, 3))
        assert result.structured_content["stdout"] == "back\n"
        await engine.wait_for_warm_pool(server.pid, within=30)  # refilled after the engine came back
        measure("pool_refilled_after_engine_back_seconds", round(time.monotonic() - back, 3))
        for language, code, out in (
            ("python", "print(6 * 7)", "42\n"),
            ("javascript", "console.log(6 * 7)", "42\n"),
            ("bash", "echo $((6 * 7))", "42\n"),
        ):
            result = await server.run(code, language=language)
            assert (result["status"], result["stdout"]) == ("success", out), result
        assert "engine_connected" in server.log()
