"""Files in, files and figures out: the host's rules, through the public API and the fake backend."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types import EmbeddedResource, ImageContent, TextContent

from codomyrmex_sandbox import FakeBackend, FakeRun, Sandbox, Settings, protocol
from codomyrmex_sandbox.errors import InvalidRequestError
from codomyrmex_sandbox.models import ExecutionResult, Limits, ReturnedFile
from codomyrmex_sandbox.output import OutputCollector
from codomyrmex_sandbox.saving import save_returned
from codomyrmex_sandbox.server import build_server
from codomyrmex_sandbox.workspace import (
    MAX_LISTED,
    UploadedFile,
    collect,
    entry_room,
    guard_trailers,
    path_problem,
    trailer_limit,
    workspace_payload,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
LIMITS = Limits(
    timeout_seconds=5, memory_mb=64, cpus=1, pids=64, open_files=64, file_size_mb=8, scratch_mb=64, output_bytes=1 << 20
)


# -- the path rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("", "empty"),
        ("/etc/passwd", "starts with /"),
        ("../escape", "'..' component"),
        ("a/../../b", "'..' component"),
        ("./a", "'.' component"),
        ("a//b", "empty component"),
        ("dir/", "empty component"),
        ("a\nb", "U+000A"),
        ("a\x00b", "U+0000"),
        ("a\x7fb", "U+007F"),
        ("a\x85b", "U+0085"),
        ("report\u2028.txt", "U+2028"),
        ("\u202etxt.exe", "U+202E"),
        ("\uff0e\uff0e/passwd", "reads as '..'"),
        ("a\\..\\b", "backslash"),
        ("x" * 256, "longer than 255 bytes"),
        ("/".join(["d" * 200] * 6), "1024"),
        ("\ud800.txt", "surrogate"),
    ],
)
def test_every_refused_spelling_names_its_rule(path: str, problem: str) -> None:
    found = path_problem(path)
    assert found is not None
    assert problem in found


@pytest.mark.parametrize("path", ["data.csv", "src/pkg/mod.py", "é/ü.txt", "%2e%2e/x", "...", "a..b", "x" * 255])
def test_ordinary_names_are_accepted(path: str) -> None:
    assert path_problem(path) is None


# -- uploads through the API ----------------------------------------------------------------------


async def sees_its_files(run: FakeRun) -> int:
    await run.write(json.dumps(sorted((path, len(data or b"")) for path, data in run.workspace.items())))
    return 0


def settings(**overrides: Any) -> Settings:
    return Settings.load(backend="fake", **overrides)


async def test_uploads_reach_the_program_as_bytes_in_every_accepted_form() -> None:
    backend = FakeBackend(sees_its_files)
    async with Sandbox(settings(), backend=backend) as sandbox:
        result = await sandbox.execute(
            "x",
            files=[
                {"path": "a.txt", "content": "héllo"},
                {"path": "bin/blob", "content": base64.b64encode(bytes(range(256))).decode(), "encoding": "base64"},
                # Wrapped base64, as MIME tools write it: the whitespace is not part of the data.
                {"path": "wrapped", "content": "aGVs\nbG8=\r\n", "encoding": "base64"},
            ],
        )
        mapped = await sandbox.execute("x", files={"raw": b"\x00\xff", "text.md": "# t"})
    assert json.loads(result.stdout) == [["a.txt", 6], ["bin/blob", 256], ["wrapped", 5]]
    assert json.loads(mapped.stdout) == [["raw", 2], ["text.md", 3]]
    assert backend.jobs[0].files[1].data == bytes(range(256))
    assert result.files == []  # nothing changed: nothing comes back


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([{"path": "../x", "content": ""}], r"files\[0\] \('../x'\): the path is refused: it has a '..' component"),
        (
            [{"path": "a", "content": ""}, {"path": "a", "content": ""}],
            r"files\[1\] \('a'\): the same path as files\[0\]",
        ),
        ([{"path": "a", "content": ""}, {"path": "a/b", "content": ""}], r"needs 'a' to be a directory"),
        ([{"path": "a", "content": "!!", "encoding": "base64"}], "not valid base64"),
        ([{"path": "a", "content": "a-_b", "encoding": "base64"}], "URL-safe alphabet"),
        ([{"path": "a", "content": "x", "encoding": "utf-16"}], "encoding"),
        (
            [{"path": "a", "content": "x", "mode": 511}],
            r"files\[0\]: unknown field 'mode' \(accepted: path, content, encoding\)",
        ),
        ([{"path": "a"}], "content"),
        ([{"path": f"f{i}", "content": ""} for i in range(65)], "65 entries, above this server's cap of 64"),
        ([{"path": "big", "content": "x" * (16 * 1024 * 1024 + 1)}], "cap of 16777216 bytes"),
    ],
)
async def test_bad_uploads_are_refused_naming_the_entry_and_the_rule_and_nothing_runs(
    files: list[dict[str, Any]], message: str
) -> None:
    backend = FakeBackend(sees_its_files)
    async with Sandbox(settings(max_output_bytes=1 << 20), backend=backend) as sandbox:
        with pytest.raises(InvalidRequestError, match=message):
            await sandbox.execute("x", files=files)
    assert backend.jobs == []


async def test_uploads_must_fit_the_sandboxs_largest_file_and_its_scratch_space() -> None:
    tight = settings(file_size_mb=1, scratch_mb=2, max_input_bytes=2 * 1024 * 1024, max_input_files=1000)
    async with Sandbox(tight, backend=FakeBackend()) as sandbox:
        with pytest.raises(InvalidRequestError, match=r"above the sandbox's largest file \(1 MiB\)"):
            await sandbox.execute("x", files={"a": b"x" * (1024 * 1024 + 1)})
        # 600 one-byte files need 600 pages of tmpfs, more than 2 MiB.
        with pytest.raises(InvalidRequestError, match=r"need \d+ bytes of the working directory"):
            await sandbox.execute("x", files={f"f{i}": b"x" for i in range(600)})


def test_an_upload_cap_above_the_scratch_space_is_a_configuration_error() -> None:
    with pytest.raises(Exception, match="max_input_bytes must not exceed the scratch space"):
        settings(scratch_mb=1, max_input_bytes=2 * 1024 * 1024)


# -- returned files and figures ------------------------------------------------------------------


async def leaves_files(run: FakeRun) -> int:
    run.workspace["in.csv"] = b"a,b\n1,2\n"  # uploaded unchanged: not returned
    run.workspace["changed.txt"] = b"new"
    run.workspace["out/report.md"] = "# Résumé\n".encode()
    run.workspace["out/data.bin"] = b"\x00\x01\xfe"
    run.workspace["out/plot.png"] = PNG
    run.workspace["out/fake.png"] = b"not an image at all"
    run.workspace["link"] = None
    run.figures.append(PNG)
    return 0


async def test_created_and_changed_files_come_back_sorted_with_their_bytes_and_types() -> None:
    async with Sandbox(settings(), backend=FakeBackend(leaves_files)) as sandbox:
        result = await sandbox.execute("x", files={"in.csv": "a,b\n1,2\n", "changed.txt": "old"})
    assert [entry.path for entry in result.files] == [
        "changed.txt",
        "link",
        "out/data.bin",
        "out/fake.png",
        "out/plot.png",
        "out/report.md",
    ]
    by_path = {entry.path: entry for entry in result.files}
    assert by_path["changed.txt"].content == b"new"
    assert by_path["changed.txt"].sha256 == hashlib.sha256(b"new").hexdigest()
    assert by_path["out/report.md"].text == "# Résumé\n"
    assert by_path["out/report.md"].mime_type == "text/markdown"
    assert by_path["out/data.bin"].text is None
    assert by_path["out/data.bin"].mime_type == "application/octet-stream"
    assert by_path["out/plot.png"].mime_type == "image/png"
    assert by_path["out/fake.png"].mime_type == "text/plain"  # a name never makes content an image
    link = by_path["link"]
    assert (link.omitted, link.content, link.text, link.sha256) == ("not_regular", None, None, "")
    (figure,) = result.figures
    assert (figure.path, figure.mime_type, figure.content, figure.omitted) == ("figure-1.png", "image/png", PNG, None)
    assert result.files_complete is True
    assert "content" not in result.model_dump(mode="json")["files"][0]


async def test_every_cap_gives_its_omitted_reason_and_nothing_goes_unlisted() -> None:
    async def many(run: FakeRun) -> int:
        run.workspace.update({f"small{i}": b"s" * 10 for i in range(3)})
        run.workspace["huge"] = b"h" * 2048
        run.workspace["mid"] = b"m" * 900
        return 0

    tight = settings(max_output_files=2, max_output_file_bytes=1024, max_output_files_bytes=1000)
    async with Sandbox(tight, backend=FakeBackend(many)) as sandbox:
        result = await sandbox.execute("x")
    reasons = {entry.path: entry.omitted for entry in result.files}
    # Walk order is by path: huge (too large), mid (returned), small0 (returned), small1 and small2 (count).
    assert reasons == {"huge": "too_large", "mid": None, "small0": None, "small1": "over_count", "small2": "over_count"}
    expected = {"huge": b"h" * 2048, "mid": b"m" * 900, **{f"small{i}": b"s" * 10 for i in range(3)}}
    assert {entry.path: entry.sha256 for entry in result.files} == {
        path: hashlib.sha256(data).hexdigest() for path, data in expected.items()
    }

    async def total(run: FakeRun) -> int:
        run.workspace.update({"a": b"a" * 600, "b": b"b" * 600})
        return 0

    async with Sandbox(tight, backend=FakeBackend(total)) as sandbox:
        result = await sandbox.execute("x")
    assert [entry.omitted for entry in result.files] == [None, "over_total"]
    assert result.files[1].sha256 == hashlib.sha256(b"b" * 600).hexdigest()


async def test_past_the_listing_cap_files_are_counted() -> None:
    async def floods(run: FakeRun) -> int:
        run.workspace.update({f"f{i:05}": b"" for i in range(MAX_LISTED + 7)})
        return 0

    async with Sandbox(settings(), backend=FakeBackend(floods)) as sandbox:
        result = await sandbox.execute("x")
    assert len(result.files) == MAX_LISTED
    assert result.files_unlisted == 7
    assert sum(entry.omitted is None for entry in result.files) == 32
    assert "(7 more created or changed files not listed)" in result.render_text()


async def test_a_program_that_did_not_end_by_itself_has_no_report_and_says_so() -> None:
    async def hangs(run: FakeRun) -> int:
        run.workspace["partial"] = b"x"
        await run.write("working\n")
        import anyio  # noqa: PLC0415 - only here

        await anyio.sleep_forever()
        return 0

    async with Sandbox(settings(), backend=FakeBackend(hangs)) as sandbox:
        result = await sandbox.execute("x", timeout_seconds=0.05)
    assert result.status == "timeout"
    assert (result.files, result.files_complete) == ([], False)


# -- the report is untrusted data ----------------------------------------------------------------


def entry(path: bytes, content: bytes | None, *, sha: bytes | None = None, size: int | None = None) -> bytes:
    digest = sha if sha is not None else hashlib.sha256(content or b"").hexdigest().encode()
    body = b"-" if content is None else base64.b64encode(content)
    omitted = b"-" if content is not None else b"too_large"
    length = len(content or b"") if size is None else size
    return b" ".join([base64.b64encode(path), b"%d" % length, digest, omitted, body])


@pytest.mark.parametrize(
    "bad",
    [
        entry(b"../../etc/passwd", b"x"),
        entry(b"/abs", b"x"),
        entry(b"ok", b"x", sha=b"0" * 64),  # the hash does not match the content
        entry(b"ok", b"x", size=5),  # nor does the size
        b"not five fields",
        b"!!! 1 - - -",
        entry(b"ok", None, sha=b"zz"),
    ],
)
def test_a_malformed_or_lying_entry_is_dropped_and_the_list_says_incomplete(bad: bytes) -> None:
    good = entry(b"good", b"fine")
    out = collect([bad, good], [], b"2 0 1", LIMITS)
    assert [item.path for item in out.files] == ["good"]
    assert out.complete is False


def test_a_figure_that_is_not_a_png_is_never_shown_as_one() -> None:
    real = b"%d - - %s" % (len(PNG), base64.b64encode(PNG))
    fake = b"%d - - %s" % (4, base64.b64encode(b"GIF8"))
    out = collect([], [fake, real], b"0 0 1", LIMITS)
    assert [(f.path, f.content) for f in out.figures] == [("figure-1.png", PNG)]


def test_the_host_applies_the_caps_again_whatever_the_report_claims() -> None:
    tight = LIMITS.model_copy(update={"output_files": 1})
    out = collect([entry(b"a", b"1"), entry(b"b", b"2")], [], b"2 0 1", tight)
    assert [(f.path, f.omitted) for f in out.files] == [("a", None), ("b", "over_count")]
    assert out.files[1].content is None


def test_without_the_end_of_the_report_the_list_is_incomplete() -> None:
    assert collect([entry(b"a", b"1")], [], None, LIMITS).complete is False
    assert collect([], [], b"0 0 0", LIMITS).complete is False
    assert collect([], [], b"0 0 1", LIMITS).complete is True


# -- the collector: two nonces, bounded memory ----------------------------------------------------


async def test_only_the_inits_nonce_carries_files_and_only_the_runners_carries_figures() -> None:
    runner, guard = protocol.new_nonce(), protocol.new_nonce()
    collector = OutputCollector(
        1 << 20,
        runner,
        guard_nonce=guard,
        max_entry_trailer=trailer_limit(LIMITS.output_file_bytes),
        max_entry_bytes=entry_room(LIMITS),
    )
    forged_file = protocol.trailer(runner, "file", entry(b"forged", b"x"))  # the program knows this nonce
    forged_rv = protocol.trailer(guard, "rv", b"QQ==")
    real = protocol.trailer(guard, "file", entry(b"real", b"y"))
    end = protocol.trailer(guard, "files-end", b"1 0 1")
    stream = b"out " + forged_file + forged_rv + real + end
    for offset in range(0, len(stream), 7):  # split anywhere, markers included
        await collector.feed("stdout", stream[offset : offset + 7])
    await collector.finish()
    assert collector.size("stdout") == len(b"out " + forged_file + forged_rv)
    out = collect(collector.entries("file"), collector.entries("fig"), collector.trailers.get("files-end"), LIMITS)
    assert [f.path for f in out.files] == ["real"]


async def test_entries_beyond_their_room_are_dropped_not_kept() -> None:
    runner, guard = protocol.new_nonce(), protocol.new_nonce()
    collector = OutputCollector(1024, runner, guard_nonce=guard, max_entry_trailer=4096, max_entry_bytes={"fig": 100})
    for _ in range(5):
        await collector.feed("stdout", protocol.trailer(runner, "fig", b"4 - - " + b"A" * 40))
    assert len(collector.entries("fig")) == 2
    assert collector.entries_dropped == 3


def test_the_workspace_header_and_files_are_what_the_init_reads() -> None:
    nonce = "0" * 32
    payload = workspace_payload([UploadedFile("a/b.txt", b"hi")], nonce, LIMITS, 2.0)
    header, _, files = payload.partition(b"\n")
    assert header == f"CODOMYRMEX-WS1 {nonce} 13 32 4194304 16777216 1000 2000".encode()
    assert files == b"7 2\na/b.txthi"


def test_the_reference_rules_skip_unchanged_uploads() -> None:
    uploads = [UploadedFile("same", b"1"), UploadedFile("edited", b"1")]
    trailers = guard_trailers("f" * 32, {"same": b"1", "edited": b"2"}, {u.path: u.data for u in uploads}, LIMITS)
    assert len(trailers) == 2  # one entry, one end


# -- over MCP: content blocks ---------------------------------------------------------------------


async def test_figures_and_files_travel_as_image_and_resource_blocks_never_in_structured_content() -> None:
    async with (
        Sandbox(settings(), backend=FakeBackend(leaves_files)) as sandbox,
        Client(build_server(sandbox)) as client,
    ):
        result = await client.call_tool("execute_code", {"code": "x", "files": [{"path": "in.csv", "content": "a"}]})
    assert result.is_error is False
    data = result.structured_content
    assert data is not None
    assert "content" not in json.dumps(data["files"])
    execution_id = data["execution_id"]
    text, *blocks = result.content
    assert isinstance(text, TextContent)
    assert "figure-1.png" in text.text
    images = [block for block in blocks if isinstance(block, ImageContent)]
    resources = [block for block in blocks if isinstance(block, EmbeddedResource)]
    assert [base64.b64decode(image.data) for image in images] == [PNG, PNG]  # the figure, then out/plot.png
    assert all(image.mime_type == "image/png" for image in images)
    uris = {str(block.resource.uri): block.resource for block in resources}
    base = f"sandbox://executions/{execution_id}/files/"
    assert set(uris) == {base + p for p in ("changed.txt", "in.csv", "out/data.bin", "out/fake.png", "out/report.md")}
    assert uris[base + "out/report.md"].text == "# Résumé\n"  # type: ignore[union-attr]
    assert base64.b64decode(uris[base + "out/data.bin"].blob) == b"\x00\x01\xfe"  # type: ignore[union-attr]


async def test_the_audit_record_has_counts_sizes_and_hashes_never_names_or_content(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    async with Sandbox(settings(audit_log_path=audit), backend=FakeBackend(leaves_files)) as sandbox:
        await sandbox.execute("x", files={"secret-name.csv": b"secret-content"})
    text = audit.read_text()
    assert "secret" not in text
    started, ended = (json.loads(line) for line in text.splitlines())
    assert started["files_in"] == {
        "count": 1,
        "bytes": 14,
        "sha256": [hashlib.sha256(b"secret-content").hexdigest()],
    }
    assert ended["files_out"]["count"] == 7
    assert ended["figures_out"]["count"] == 1


# -- saving what came back (the CLI's --out) ------------------------------------------------------


def returned(path: str, content: bytes | None = b"data") -> ReturnedFile:
    return ReturnedFile(
        path=path, size_bytes=4, mime_type="text/plain", sha256="", text=None, omitted=None, content=content
    )


def test_saving_never_writes_outside_the_directory_whatever_the_names_or_links(tmp_path: Path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "escape").symlink_to(outside)  # a link already in the directory
    (out / "victim").symlink_to(outside / "victim")
    result = ExecutionResult.model_validate(
        {
            "execution_id": "e",
            "status": "success",
            "exit_code": 0,
            "signal": None,
            "stdout": "",
            "stderr": "",
            "stdout_truncated": False,
            "stderr_truncated": False,
            "return_value": None,
            "duration_ms": 1,
            "language": "python",
            "runtime": "python",
        }
    ).model_copy(
        update={
            "files": [
                returned("ok/nested.txt"),
                returned("../up.txt"),
                returned("/abs.txt"),
                returned("escape/through-link.txt"),
                returned("victim"),
                returned("a\nb"),
                returned("big.bin", None),
            ]
        }
    )
    lines = save_returned(result, out)
    assert (out / "ok" / "nested.txt").read_bytes() == b"data"
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "up.txt").exists()
    assert sum(line.startswith("saved ") for line in lines) == 1
    assert len(lines) == 7


@pytest.mark.parametrize(("which", "kinds"), [("images", [ImageContent, ImageContent]), ("none", [])])
async def test_the_operator_can_leave_file_blocks_or_all_blocks_out(which: str, kinds: list[type]) -> None:
    async with (
        Sandbox(settings(result_content_blocks=which), backend=FakeBackend(leaves_files)) as sandbox,
        Client(build_server(sandbox)) as client,
    ):
        result = await client.call_tool("execute_code", {"code": "x"})
    text, *blocks = result.content
    assert isinstance(text, TextContent)
    assert [type(block) for block in blocks] == kinds
    data = result.structured_content
    assert data is not None
    assert len(data["files"]) == 7  # the structured result lists everything either way
    assert data["figures"][0]["path"] == "figure-1.png"


async def test_the_python_apis_mapping_keeps_bytes_as_bytes_and_refuses_other_types() -> None:
    backend = FakeBackend(sees_its_files)
    async with Sandbox(settings(), backend=backend) as sandbox:
        await sandbox.execute("x", files={"a.bin": bytearray(b"\x00\x01"), "b.txt": "é"})
        with pytest.raises(InvalidRequestError, match=r"files\['x'\]: content must be bytes or str, not int"):
            await sandbox.execute("x", files={"x": 5})  # type: ignore[dict-item]
        with pytest.raises(InvalidRequestError, match="a path must be a str, not bytes"):
            await sandbox.execute("x", files={b"x": b""})  # type: ignore[dict-item]
        with pytest.raises(InvalidRequestError, match=r"files\[0\] \('../x'\): the path is refused"):
            await sandbox.execute("x", files={"../x": b""})
    assert [(u.path, u.data) for u in backend.jobs[0].files] == [("a.bin", b"\x00\x01"), ("b.txt", "é".encode())]
    assert len(backend.jobs) == 1


def test_a_name_with_control_characters_is_listed_with_them_made_visible() -> None:
    hostile = "report\x1b[2J\n\u202eexe.txt".encode()
    out = collect([entry(hostile, b"x")], [], b"1 0 1", LIMITS)
    (listed,) = out.files
    assert listed.path == "report\\u001b[2J\\u000a\\u202eexe.txt"
    assert listed.content == b"x"
    assert "\x1b" not in listed.path


def test_entries_lost_on_the_way_make_the_list_incomplete() -> None:
    """The end trailer counts what the init wrote: an entry that never arrived as one (in a session,
    a background process writing while the init reports can split it) makes the list incomplete."""
    assert collect([entry(b"a", b"1")], [], b"1 0 1", LIMITS).complete is True
    assert collect([entry(b"a", b"1")], [], b"2 0 1", LIMITS).complete is False
