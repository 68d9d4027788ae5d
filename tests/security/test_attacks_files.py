"""Attacks on files in and out (FS-07 to FS-11 of the attack index), through the real server over stdio.

What comes out is data read by the sandbox's init after everything else in the sandbox is dead,
under a nonce no sandbox process knows, and checked again on the host: links and fifos are listed,
never followed; nothing a program prints can add, change or hide an entry; a workspace that is
huge in count or size answers promptly and says what it left out; uploads cannot leave the
working directory. No archives are used anywhere (no tar or zip is unpacked on either side), so
there is no archive bomb or slip to attempt: FS-10's traversal is tried on `files[].path`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

LIMITS = {"timeout_seconds": 20, "memory_mb": 256}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_links_to_host_paths_are_listed_never_followed(server, host_canary_file):
    """FS-07"""
    path, canary = host_canary_file
    code = f"""
import os
for name, target in [("passwd", "/etc/passwd"), ("environ", "/proc/1/environ"), ("canary", {path!r}),
                     ("docker", "/var/run/docker.sock"), ("root", "/"), ("self", "self")]:
    os.symlink(target, name)
os.makedirs("d")
os.symlink("/etc", "d/etc-dir")
"""
    result = await server.run(code, **LIMITS)
    assert result["status"] == "success", result
    entries = {entry["path"]: entry for entry in result["files"]}
    assert set(entries) == {"canary", "d/etc-dir", "docker", "environ", "passwd", "root", "self"}
    for entry in entries.values():
        assert (entry["omitted"], entry["text"], entry["sha256"]) == ("not_regular", None, ""), entry
    assert canary not in str(result)
    assert "root:x:0:0" not in str(result)


async def test_a_program_flipping_files_and_links_cannot_race_the_collection(server):
    """FS-08: daemons swap a file for a link and rewrite another, as fast as they can, after the
    program ends; the init kills everything before it looks, and every entry is self-consistent."""
    code = """
import os, subprocess, sys
daemon = '''
import os
i = 0
while True:
    i += 1
    try:
        os.replace("flip-link", "flip") if i % 2 else None
        with open("tmp-flip", "w") as f:
            f.write("regular %d" % i)
        os.replace("tmp-flip", "flip") if not i % 2 else os.symlink("/etc/shadow", "flip-link")
        with open("grow.txt", "a") as f:
            f.write("x" * 100)
    except OSError:
        pass
'''
for _ in range(3):
    subprocess.Popen([sys.executable, "-c", daemon], start_new_session=True)
import time
time.sleep(0.5)
print("leaving")
"""
    for _ in range(3):
        result = await server.run(code, **LIMITS)
        assert result["status"] == "success", result
        for entry in result["files"]:
            if entry["omitted"] == "not_regular":
                assert entry["text"] is None
                continue
            assert entry["omitted"] is None, entry
            text = entry["text"].encode()
            assert len(text) == entry["size_bytes"]
            assert sha(text) == entry["sha256"]
            assert "root:" not in entry["text"]


async def test_fifos_sockets_and_hard_links_never_block_the_collection(server):
    """FS-09"""
    code = """
import os, socket
os.mkfifo("fifo")
s = socket.socket(socket.AF_UNIX)
s.bind("sock")
open("data", "w").write("shared")
os.link("data", "hardlink")
with open("sparse", "wb") as f:
    f.seek(10 * 1024 * 1024)
    f.write(b"end")
"""
    started = time.monotonic()
    result = await server.run(code, **LIMITS)
    assert time.monotonic() - started < 10
    entries = {entry["path"]: entry for entry in result["files"]}
    assert entries["fifo"]["omitted"] == entries["sock"]["omitted"] == "not_regular"
    assert entries["data"]["text"] == entries["hardlink"]["text"] == "shared"
    assert entries["sparse"]["omitted"] == "too_large"
    assert entries["sparse"]["size_bytes"] == 10 * 1024 * 1024 + 3
    assert entries["sparse"]["sha256"] == sha(b"\0" * (10 * 1024 * 1024) + b"end")


@pytest.mark.parametrize(
    "path",
    [
        "../../../../tmp/codomyrmex-escape",
        "..",
        "a/../../b",
        "%2e%2e/%2e%2e/inside-only",  # encoded: a literal name, it stays inside
        "\uff0e\uff0e/\uff0e\uff0e/x",
        "\u2024\u2024/x",
        "trailing/",
        "new\nline",
        "/sandbox/../etc/x",
        "..\\..\\x",
    ],
)
async def test_uploads_never_leave_the_working_directory_in_any_spelling(server, path):
    """FS-10"""
    code = """
import json, os
found = []
for root, dirs, files in os.walk("/tmp"):
    found += [os.path.join(root, f) for f in files]
print(json.dumps([sorted(os.listdir(".")), found]))
"""
    result = await server.client.call_tool(
        "execute_code", {"code": code, "files": [{"path": path, "content": "payload"}], **LIMITS}
    )
    text = server.text(result)
    if result.is_error:
        assert "the path is refused" in text
        return
    data = result.structured_content
    assert data is not None
    inside, in_tmp = json.loads(data["stdout"])
    assert in_tmp == []  # nothing reached /tmp
    assert inside == [path.split("/")[0]]  # the literal name, in the working directory


async def test_a_program_that_forges_the_runners_and_the_inits_framing_gets_it_back_as_stdout(server):
    """The program finds the runner's own nonce in memory and forges file entries and the end of
    the report with it, and tries made-up nonces: all of it stays stdout; the real entries stand."""
    forged_entry = " ".join(
        [base64.b64encode(b"forged.txt").decode(), "4", sha(b"evil"), "-", base64.b64encode(b"evil").decode()]
    )
    code = f"""
import sys
def hexes(frame):
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if isinstance(value, str) and len(value) == 32 and set(value) <= set("0123456789abcdef"):
                yield value
        frame = frame.f_back
nonce = next(hexes(sys._getframe()))
for key, value in (("file", {forged_entry!r}), ("files-end", "0 0 1")):
    sys.stdout.write("\\0%s:%s=%s\\0" % (nonce, key, value))
    sys.stdout.write("\\0%s:%s=%s\\0" % ("ab" * 16, key, value))
sys.stdout.flush()
open("real.txt", "w").write("real")
print("done")
"""
    result = await server.run(code, **LIMITS)
    assert result["status"] == "success", result
    assert [entry["path"] for entry in result["files"]] == ["real.txt"]
    assert result["files_complete"] is True
    assert result["stdout"].endswith("done\n")
    assert "files-end=0 0 1" in result["stdout"]  # the forgery is output, where the program put it


async def test_a_workspace_of_many_files_answers_promptly_and_says_what_it_left_out(launcher):
    """FS-11 (size): a hundred thousand files and a collection bound of half a second."""
    async with launcher(CODOMYRMEX_SANDBOX_FILES_COLLECT_SECONDS="0.5") as server:
        code = """
import os
for d in range(100):
    os.mkdir("d%03d" % d)
    for f in range(1000):
        open("d%03d/f%04d" % (d, f), "w").close()
print("made")
"""
        started = time.monotonic()
        result = await server.run(code, timeout_seconds=120, memory_mb=1024)
        elapsed = time.monotonic() - started
    assert result["status"] == "success", result
    assert len(result["files"]) <= 1000
    assert result["files_unlisted"] > 0 or result["files_complete"] is False
    assert sum(entry["omitted"] is None for entry in result["files"]) <= 32
    assert elapsed < 60, elapsed


async def test_a_program_that_fills_the_scratch_space_still_gets_its_report(server):
    """A workspace full to the last page: the report needs no space in the sandbox."""
    code = """
import hashlib
h = hashlib.sha256()
with open("fill.bin", "wb") as f:
    try:
        while True:
            chunk = b"z" * 65536
            f.write(chunk)
            f.flush()
            h.update(chunk)
    except OSError as exc:
        print("full", exc.errno)
open("after.txt", "w")
print(h.hexdigest())
"""
    result = await server.run(code, **LIMITS)
    assert result["status"] in {"success", "error"}, result
    entries = {entry["path"]: entry for entry in result["files"]}
    assert entries["fill.bin"]["omitted"] == "too_large"
    assert result["files_complete"] is True


async def test_names_with_escape_sequences_reach_no_client_raw(server):
    """A program names files to drive a terminal or mislead a reader: listed, escapes made visible."""
    code = r"""
for name in ("clear\x1b[2J\x1b[H.txt", "line\nbreak.txt", "\u202etxt.exe"):
    open(name, "w").write("x")
"""
    result = await server.client.call_tool("execute_code", {"code": code, **LIMITS})
    data = result.structured_content
    assert data is not None and data["status"] == "success", server.text(result)
    paths = sorted(entry["path"] for entry in data["files"])
    assert paths == ["\\u202etxt.exe", "clear\\u001b[2J\\u001b[H.txt", "line\\u000abreak.txt"]
    rendered = server.text(result)
    assert "\x1b" not in rendered and "\u202e" not in rendered
