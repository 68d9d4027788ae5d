"""The Docker backend's parts that need no engine: error translation, the attach stream, orphans, evidence."""

from __future__ import annotations

import os
import socket
import struct
from concurrent.futures import Future
from typing import Any

import anyio
import anyio.to_thread
import docker.errors
import pytest
import requests

from codomyrmex_sandbox import Sandbox, Settings
from codomyrmex_sandbox.backends.base import Evidence
from codomyrmex_sandbox.backends.docker import DockerBackend
from codomyrmex_sandbox.backends.docker.attach import Attachment
from codomyrmex_sandbox.backends.docker.engine import Engine, EngineLostError, connect
from codomyrmex_sandbox.backends.docker.evidence import SIGKILL_EXIT, with_usage
from codomyrmex_sandbox.backends.docker.labels import LABEL_EXPIRES, LABEL_HOST, LABEL_PID, is_orphan, sweep_orphans
from codomyrmex_sandbox.backends.docker.spec import ContainerSpec
from codomyrmex_sandbox.errors import BackendError, EngineUnavailableError, RuntimeUnavailableError
from codomyrmex_sandbox.models import MIB, ResourceUsage
from codomyrmex_sandbox.policy import default_limits

# -- the engine: every docker-py and requests error becomes one of the package's ----------------


def api_error(status: int) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError(f"{status} from the engine (test)", response=response)


class Raising:
    """A docker-py client whose every API call raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.api = self

    def __getattr__(self, name: str) -> Any:
        def call(*_: object, **__: object) -> None:
            raise self.error

        return call


SPEC = ContainerSpec(
    image="cdmx-python:abc", command=("true",), user="1:1", name="n", labels={}, network_disabled=True, host_config={}
)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (docker.errors.ImageNotFound("No such image: cdmx-python:abc"), RuntimeUnavailableError),
        (requests.exceptions.ConnectionError("connection refused"), EngineLostError),
        (ConnectionResetError("reset by peer"), EngineLostError),
        (FileNotFoundError("/var/run/docker.sock"), EngineLostError),
        (api_error(500), BackendError),
        (requests.exceptions.ReadTimeout("read timed out"), BackendError),
        (docker.errors.DockerException("anything else"), BackendError),
    ],
)
def test_every_engine_error_is_translated_into_the_packages_own(error, expected):
    with pytest.raises(expected) as raised:
        Engine(Raising(error)).create(SPEC)  # type: ignore[arg-type]
    assert raised.value.__cause__ is error


def test_a_lost_engine_is_an_unavailable_engine_to_callers_and_says_how_to_fix_it():
    with pytest.raises(EngineUnavailableError, match=r"lost the Docker engine .* start the Docker engine"):
        Engine(Raising(ConnectionRefusedError())).start("cid")  # type: ignore[arg-type]


def test_a_missing_runtime_image_names_the_image_and_the_command_that_builds_it():
    with pytest.raises(RuntimeUnavailableError, match=r"cdmx-python:abc is missing; run `codomyrmex-sandbox runtimes"):
        Engine(Raising(docker.errors.ImageNotFound("no such image"))).create(SPEC)  # type: ignore[arg-type]


def test_an_unreachable_engine_is_unavailable_not_lost():
    settings = Settings.load(backend="docker", docker_host="unix:///nonexistent/docker.sock")
    with pytest.raises(EngineUnavailableError, match="not reachable") as raised:
        connect(settings)
    assert not isinstance(raised.value, EngineLostError)


def test_a_name_in_use_is_an_answer_not_an_error():
    assert Engine(Raising(api_error(409))).create(SPEC) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [404, 409])
def test_killing_a_container_that_is_gone_or_stopped_is_fine(status):
    Engine(Raising(api_error(status))).kill("cid")  # type: ignore[arg-type]


def test_a_failed_kill_is_an_error():
    with pytest.raises(BackendError):
        Engine(Raising(api_error(500))).kill("cid")  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [docker.errors.NotFound("gone"), api_error(409)])
def test_removing_a_container_that_is_gone_or_being_removed_is_fine(error):
    assert Engine(Raising(error)).remove("cid") is False  # type: ignore[arg-type]


def test_an_image_the_engine_does_not_have_has_no_labels():
    assert Engine(Raising(docker.errors.ImageNotFound("no such image"))).image_labels("x") is None  # type: ignore[arg-type]


def test_a_removed_container_has_no_oom_flag_any_more():
    assert Engine(Raising(docker.errors.NotFound("gone"))).oom_killed("cid") is None  # type: ignore[arg-type]


# -- the attach stream ---------------------------------------------------------------------------


def frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(data)) + data


async def read_all(attachment: Attachment) -> list[tuple[str, bytes]]:
    send, receive = anyio.create_memory_object_stream[tuple[str, bytes]](16)
    items: list[tuple[str, bytes]] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, attachment.read_frames, send)
            async with receive:
                items.extend([item async for item in receive])
    return items


async def test_frames_are_demultiplexed_into_stdout_and_stderr_until_the_stream_ends():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(frame(1, b"out") + frame(3, b"not a stream") + frame(2, b"err") + frame(1, b"") + frame(1, b"!"))
        theirs.shutdown(socket.SHUT_WR)
        assert await read_all(Attachment(ours)) == [("stdout", b"out"), ("stderr", b"err"), ("stdout", b"!")]


async def test_a_frame_cut_short_ends_the_stream_with_what_arrived():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(frame(1, b"whole") + struct.pack(">BxxxL", 1, 100) + b"part")
        theirs.shutdown(socket.SHUT_WR)
        assert await read_all(Attachment(ours)) == [("stdout", b"whole"), ("stdout", b"part")]


async def test_hanging_up_wakes_a_reader_blocked_on_a_silent_sandbox():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        attachment = Attachment(ours)
        async with anyio.create_task_group() as tg:

            async def hang_up_soon() -> None:
                await anyio.sleep(0.1)
                attachment.hang_up()

            tg.start_soon(hang_up_soon)
            assert await read_all(attachment) == []


def test_the_payload_is_handed_over_in_one_frame_and_the_lease_stays_open():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        Attachment(ours).hand_over(b"header\ncode")
        expected = b"11\nheader\ncode"
        received = b""
        while len(received) < len(expected):
            received += theirs.recv(100)
        assert received == expected
        theirs.settimeout(0.0)
        with pytest.raises(BlockingIOError):  # no end of stream: the sending side is the lease
            theirs.recv(100)


def test_a_pool_member_is_usable_only_while_alive_and_silent():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        attachment = Attachment(ours)
        waiting: Future[int | None] = Future()
        assert attachment.waiting_for_code(waiting)
        exited: Future[int | None] = Future()
        exited.set_result(137)
        assert not attachment.waiting_for_code(exited)
        theirs.sendall(b"x")
        assert not attachment.waiting_for_code(waiting)


def test_a_pool_member_whose_stream_ended_is_not_usable():
    ours, theirs = socket.socketpair()
    with ours:
        theirs.close()
        assert not Attachment(ours).waiting_for_code(None)


# -- labels and the sweep of orphans -------------------------------------------------------------


def test_a_container_past_its_deadline_is_an_orphan_wherever_its_server_runs():
    assert is_orphan({LABEL_EXPIRES: "99", LABEL_HOST: "elsewhere"}, "here", now=100)
    assert is_orphan({LABEL_EXPIRES: "not a time"}, "here", now=100)
    assert not is_orphan({LABEL_EXPIRES: "101", LABEL_HOST: "elsewhere", LABEL_PID: "1"}, "here", now=100)


def test_a_container_whose_server_on_this_host_is_gone_is_an_orphan():
    alive = {LABEL_EXPIRES: "1e12", LABEL_HOST: "here", LABEL_PID: str(os.getpid())}
    assert not is_orphan(alive, "here", now=100)
    assert is_orphan(alive | {LABEL_PID: "999999999"}, "here", now=100)


class Containers:
    def __init__(self, containers: dict[str, dict[str, str]], gone: frozenset[str] = frozenset()) -> None:
        self.all = containers
        self.gone = gone
        self.removed: list[str] = []

    def containers(self, label: str) -> list[tuple[str, dict[str, str]]]:
        assert label == "io.codomyrmex.sandbox.managed=true"
        return list(self.all.items())

    def remove(self, cid: str) -> bool:
        self.removed.append(cid)
        return cid not in self.gone


def test_the_sweep_removes_only_orphans_and_counts_what_it_removed():
    live = {LABEL_EXPIRES: "1e12", LABEL_HOST: "here", LABEL_PID: str(os.getpid())}
    engine = Containers(
        {"live": live, "old": {LABEL_EXPIRES: "1"}, "raced": {LABEL_EXPIRES: "1"}}, frozenset({"raced"})
    )
    assert sweep_orphans(engine, "here") == 1  # type: ignore[arg-type]
    assert engine.removed == ["old", "raced"]


# -- evidence: how a sandbox ended ---------------------------------------------------------------

LIMIT = 64 * MIB


def usage(peak: int | None, *, oom_kills: int = 0, hit: bool = False) -> ResourceUsage:
    return ResourceUsage(cpu_time_ms=1.0, peak_memory_bytes=peak, memory_limit_hit=hit, oom_kills=oom_kills)


def test_a_sigkill_no_one_on_the_host_sent_with_memory_at_the_limit_is_the_oom_killer():
    evidence, seen = with_usage(Evidence(exit_code=SIGKILL_EXIT), usage(LIMIT - 4096), None, LIMIT)
    assert evidence.oom_killed
    assert seen is not None
    assert (seen.memory_limit_hit, seen.oom_kills) == (True, 1)


@pytest.mark.parametrize(
    ("evidence", "reported_exit"),
    [
        (Evidence(exit_code=SIGKILL_EXIT, timed_out=True), None),  # the host's kill at the deadline
        (Evidence(exit_code=SIGKILL_EXIT, output_capped=True), None),
        (Evidence(exit_code=SIGKILL_EXIT), 137),  # sys.exit(137), as the runner reported
        (Evidence(exit_code=1), None),
    ],
)
def test_an_end_the_host_or_the_program_explains_is_not_taken_for_the_oom_killer(evidence, reported_exit):
    judged, _ = with_usage(evidence, usage(LIMIT), reported_exit, LIMIT)
    assert not judged.oom_killed


def test_a_sigkill_far_below_the_limit_is_not_taken_for_the_oom_killer():
    judged, seen = with_usage(Evidence(exit_code=SIGKILL_EXIT), usage(LIMIT // 2), None, LIMIT)
    assert not judged.oom_killed
    assert seen is not None
    assert not seen.memory_limit_hit


def test_the_kernels_oom_count_is_evidence_of_its_own():
    judged, seen = with_usage(Evidence(exit_code=1), usage(LIMIT // 2, oom_kills=2, hit=True), 1, LIMIT)
    assert judged.oom_killed
    assert seen is not None
    assert seen.oom_kills == 2


def test_without_readable_counters_the_evidence_stands_as_it_was():
    evidence = Evidence(exit_code=SIGKILL_EXIT)
    assert with_usage(evidence, None, None, LIMIT) == (evidence, None)


def test_the_backend_sizes_its_warm_sandboxes_from_the_policies_it_is_handed():
    settings = Settings.load(
        pool_size=1,
        pool_max_age_seconds=100,
        language_limits={"bash": {"max_timeout_seconds": 40, "default_timeout_seconds": 5, "default_memory_mb": 96}},
    )
    sandbox = Sandbox(settings)  # not entered: nothing touches the engine
    backend = sandbox.backend
    assert isinstance(backend, DockerBackend)
    # Pool members start with each language's defaults, and live long enough for its largest timeout.
    assert backend._pool_limits["bash"] == default_limits(sandbox.policies["bash"])
    assert (backend._pool_limits["bash"].timeout_seconds, backend._pool_limits["bash"].memory_mb) == (5, 96)
    assert backend._pool_lifetimes == {"bash": 140, "javascript": 400, "python": 400}
