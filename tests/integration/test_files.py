"""Files in, files and figures out, against the real engine and images, through real MCP clients.

Every language over stdio (the console script), the refusals and every `omitted` reason, a
matplotlib chart travelling as an image block, an uploaded project whose tests run, the CLI's
--file/--out, and calls that never see an earlier call's files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types import EmbeddedResource, ImageContent

from codomyrmex_sandbox import Sandbox, Settings
from codomyrmex_sandbox.server import build_server
from tests.support import owned_by_a_task

pytestmark = pytest.mark.docker

CSV = "month,sales\njan,3\nfeb,5\nmar,4\napr,8\n"
CHART = """
import pandas as pd
import matplotlib.pyplot as plt
df = pd.read_csv("sales.csv")
df.plot(x="month", y="sales", kind="bar", title="Sales")
plt.savefig("chart.png")
plt.show()
print(df["sales"].sum())
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.parametrize(
    ("language", "code"),
    [
        ("python", "import os\ndata = open('in/data.txt').read()\nopen('out.txt', 'w').write(data.upper())\n"),
        (
            "javascript",
            (
                "const fs = require('fs');\n"
                "fs.writeFileSync('out.txt', fs.readFileSync('in/data.txt', 'utf8').toUpperCase());"
            ),
        ),
        ("bash", "tr a-z A-Z < in/data.txt > out.txt"),
    ],
)
async def test_every_language_reads_uploads_and_its_new_files_come_back_over_stdio(stdio, language: str, code: str):
    files = [
        {"path": "in/data.txt", "content": "hello files\n"},
        {"path": "in/blob.bin", "content": base64.b64encode(bytes(range(256))).decode(), "encoding": "base64"},
    ]
    async with stdio() as mcp:
        result = await mcp.call({"code": code, "language": language, "files": files})
    data = result.structured_content
    assert data is not None, mcp.text(result)
    assert data["status"] == "success", data
    # Unchanged uploads do not come back; the runner left nothing of its own in the working directory.
    assert [entry["path"] for entry in data["files"]] == ["out.txt"]
    (entry,) = data["files"]
    assert entry == {
        "path": "out.txt",
        "size_bytes": 12,
        "mime_type": "text/plain",
        "sha256": sha(b"HELLO FILES\n"),
        "text": "HELLO FILES\n",
        "omitted": None,
    }
    assert data["files_complete"] is True
    (resource,) = [block for block in result.content if isinstance(block, EmbeddedResource)]
    assert str(resource.resource.uri) == f"sandbox://executions/{data['execution_id']}/files/out.txt"
    assert resource.resource.text == "HELLO FILES\n"  # type: ignore[union-attr]


async def test_uploads_belong_to_the_sandbox_user_with_ordinary_modes(sandbox: Sandbox):
    code = """
import os
for path in ("top.txt", "deep/er/file.bin"):
    st = os.stat(path)
    print(path, st.st_uid == os.getuid(), oct(st.st_mode & 0o777))
print("dir", oct(os.stat("deep/er").st_mode & 0o777), os.stat("deep").st_uid == os.getuid())
print(open("deep/er/file.bin", "rb").read() == bytes(range(256)))
"""
    result = await sandbox.execute(code, files={"top.txt": "x", "deep/er/file.bin": bytes(range(256))})
    assert result.status == "success", result.stderr
    assert result.stdout.splitlines() == [
        "top.txt True 0o644",
        "deep/er/file.bin True 0o644",
        "dir 0o755 True",
        "True",
    ]


async def test_an_agent_uploads_a_csv_and_gets_its_chart_back_as_an_image(stdio):
    async with stdio() as mcp:
        result = await mcp.call({"code": CHART, "files": [{"path": "sales.csv", "content": CSV}]})
    data = result.structured_content
    assert data is not None, mcp.text(result)
    assert data["status"] == "success", data
    assert data["stdout"] == "20\n"
    assert data["stderr"] == ""  # plt.show() neither blocks nor warns
    (figure,) = data["figures"]
    assert figure["path"] == "figure-1.png"
    assert figure["mime_type"] == "image/png"
    assert figure["omitted"] is None
    assert figure["size_bytes"] < 100_000  # sized for a model
    (chart,) = data["files"]
    assert chart["path"] == "chart.png"
    images = [block for block in result.content if isinstance(block, ImageContent)]
    assert len(images) == 2  # the figure, then the saved chart.png
    shown = base64.b64decode(images[0].data)
    assert shown.startswith(b"\x89PNG\r\n\x1a\n")
    assert sha(shown) == figure["sha256"]
    assert len(shown) == figure["size_bytes"]
    width, height = png_size(shown)
    assert 300 < width <= 2000 and 300 < height <= 2000  # a default figure, cropped to what it draws


async def test_an_uploaded_project_runs_its_tests_with_pytest(sandbox: Sandbox):
    project = {
        "mathx.py": "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a * b\n",
        "tests/test_mathx.py": "from mathx import add, mul\n\ndef test_add():\n    assert add(2, 3) == 5\n\n"
        "def test_mul():\n    assert mul(2, 3) == 7\n",
    }
    code = 'import sys, pytest\nsys.exit(pytest.main(["-q"]))'
    result = await sandbox.execute(code, files=project, timeout_seconds=60)
    assert result.status == "error", result
    assert result.exit_code == 1  # pytest's "some tests failed"
    assert "1 failed, 1 passed" in result.stdout
    assert "assert 6 == 7" in result.stdout
    fixed = {**project, "tests/test_mathx.py": project["tests/test_mathx.py"].replace("== 7", "== 6")}
    passed = await sandbox.execute(code, files=fixed, timeout_seconds=60)
    assert passed.status == "success", passed.stdout
    assert "2 passed" in passed.stdout


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([{"path": "../escape.txt", "content": "x"}], r"files[0] ('../escape.txt'): the path is refused"),
        ([{"path": "/etc/cron.d/x", "content": "x"}], "starts with /"),
        ([{"path": "a/./b", "content": "x"}], "'.' component"),
        ([{"path": "dir/", "content": "x"}], "empty component"),
        ([{"path": "name\nwith-newline", "content": "x"}], "U+000A"),
        ([{"path": "\uff0e\uff0e/x", "content": "x"}], "reads as '..'"),
        ([{"path": "..\\x", "content": "x"}], "backslash"),
        ([{"path": "a", "content": "@@@", "encoding": "base64"}], "not valid base64"),
        ([{"path": "a", "content": "x"}, {"path": "a", "content": "y"}], "the same path as files[0]"),
        ([{"path": f"f{i}", "content": ""} for i in range(65)], "65 entries"),
        ([{"path": "a", "content": "x", "owner": "root"}], "unknown field 'owner'"),
    ],
)
async def test_every_refusal_over_stdio_names_the_entry_and_the_rule_and_the_server_keeps_serving(
    stdio, files: list[dict[str, Any]], message: str
):
    async with stdio() as mcp:
        refused = await mcp.client.call_tool("execute_code", {"code": "print(1)", "files": files})
        after = await mcp.run("print('still serving')")
    assert refused.is_error is True
    assert message in mcp.text(refused)
    assert after["stdout"] == "still serving\n"


@asynccontextmanager
async def capped(**limits: Any) -> AsyncIterator[Client]:
    settings = Settings.load(**limits)
    async with owned_by_a_task(Sandbox(settings), "capped-owner") as sandbox, Client(build_server(sandbox)) as client:
        yield client


async def test_every_omitted_reason_with_the_hashes_of_what_was_left_out():
    code = """
import os, hashlib
open("big.bin", "wb").write(b"B" * 5000)
for name in ("a.txt", "b.txt", "c.txt"):
    open(name, "w").write(name * 300)
os.symlink("/etc/passwd", "passwd-link")
os.mkfifo("pipe")
print(hashlib.sha256(b"B" * 5000).hexdigest())
"""
    async with capped(max_output_files=3, max_output_file_bytes=4096, max_output_files_bytes=4000) as client:
        result = await client.call_tool("execute_code", {"code": code})
    data = result.structured_content
    assert data is not None
    entries = {entry["path"]: entry for entry in data["files"]}
    assert {path: entry["omitted"] for path, entry in entries.items()} == {
        "a.txt": None,
        "b.txt": None,
        "big.bin": "too_large",
        "c.txt": "over_total",  # 3 x 1,500 bytes: the third passes the 4,000-byte total
        "passwd-link": "not_regular",
        "pipe": "not_regular",
    }
    assert entries["big.bin"]["sha256"] == data["stdout"].strip()
    assert entries["big.bin"]["size_bytes"] == 5000
    assert entries["c.txt"]["sha256"] == sha(b"c.txt" * 300)
    assert entries["passwd-link"]["text"] is None  # never followed
    assert data["files_complete"] is True

    async with capped(max_output_files=1) as client:
        result = await client.call_tool("execute_code", {"code": "for n in 'xyz': open(n, 'w').write(n)"})
    data = result.structured_content
    assert data is not None
    assert [(e["path"], e["omitted"]) for e in data["files"]] == [("x", None), ("y", "over_count"), ("z", "over_count")]


async def test_too_many_figures_and_an_oversized_one_are_listed_not_dropped():
    code = """
import matplotlib.pyplot as plt
for i in range(3):
    plt.figure()
    plt.plot(range(100), [x * i for x in range(100)])
"""
    async with capped(max_figures=2) as client:
        result = await client.call_tool("execute_code", {"code": code})
    data = result.structured_content
    assert data is not None
    assert [(f["path"], f["omitted"]) for f in data["figures"]] == [
        ("figure-1.png", None),
        ("figure-2.png", None),
        ("figure-3.png", "over_count"),
    ]
    assert sum(isinstance(block, ImageContent) for block in result.content) == 2


async def test_a_later_call_never_sees_an_earlier_calls_files(sandbox: Sandbox):
    first = await sandbox.execute("open('left-behind.txt', 'w').write('x')", files={"upload.txt": "secret"})
    assert [entry.path for entry in first.files] == ["left-behind.txt"]
    second = await sandbox.execute("import os\nprint(sorted(os.listdir('.')))")
    assert second.stdout == "[]\n"
    assert second.files == []


async def test_the_python_api_returns_the_bytes(sandbox: Sandbox):
    code = (
        "import os\nopen('raw.bin', 'wb').write(os.urandom(3000))\n"
        "open('copy.bin', 'wb').write(open('in.bin', 'rb').read())"
    )
    payload = bytes(range(256)) * 8
    result = await sandbox.execute(code, files={"in.bin": payload})
    by_path = {entry.path: entry for entry in result.files}
    assert by_path["copy.bin"].content == payload
    assert by_path["copy.bin"].sha256 == sha(payload)
    raw = by_path["raw.bin"]
    assert raw.content is not None
    assert len(raw.content) == raw.size_bytes == 3000
    assert sha(raw.content) == raw.sha256


def test_the_cli_uploads_with_file_and_saves_what_comes_back_with_out(
    run_cli: Callable[..., Any], tmp_path: Path
) -> None:
    data = tmp_path / "numbers.csv"
    data.write_text("n\n1\n2\n3\n")
    out = tmp_path / "out"
    script = tmp_path / "job.py"
    script.write_text(
        "import pandas as pd, matplotlib.pyplot as plt\n"
        "df = pd.read_csv('input/numbers.csv')\n"
        "df.to_json('total.json')\n"
        "df.plot()\n"
    )
    done = run_cli(["run", str(script), "--file", f"{data}=input/numbers.csv", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "total.json").read_text()) == {"n": {"0": 1, "1": 2, "2": 3}}
    figure = (out / "figure-1.png").read_bytes()
    assert figure.startswith(b"\x89PNG")
    assert f"saved {out / 'total.json'}" in done.stderr
    assert not (out / "input").exists()  # unchanged uploads do not come back
    assert len(figure) < 100_000
