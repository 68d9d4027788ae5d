"""What files and figures cost: warm calls with and without them, measured in one run.

    .venv/bin/python benchmarks/files.py            # 30 samples a row (about two minutes)
    .venv/bin/python benchmarks/files.py --quick    # 10 samples a row

Targets, as differences between rows of the same run (p50, warm pool):

- 1 MiB uploaded and 1 MiB returned costs at most 20 ms more than the same call without files
  (the same program: it copies in.bin to out.bin when in.bin exists), through the Python API and
  over MCP stdio;
- one figure costs at most 150 ms more than the same plotting code that closes its figure (a
  row also compares it with the program saving the chart itself, which draws it too: the first
  drawing in a process, fonts and text layout, is most of a figure's cost).

Prints Markdown tables and writes the raw numbers to benchmarks/results/files-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

from codomyrmex_sandbox import Sandbox, Settings

sys.path.insert(0, str(Path(__file__).parent))
from run import SCRIPT, _refilled, atimed, percentiles, table, verdict

MIB = 1024 * 1024
COPY = "import os\nif os.path.exists('in.bin'):\n    open('out.bin', 'wb').write(open('in.bin', 'rb').read())"
PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2, 4])\nplt.title('one figure')\n"
SETTLE_SECONDS = 0.3


async def api_rows(count: int) -> dict[str, Any]:
    payload = os.urandom(MIB)
    rows: dict[str, Any] = {}
    async with Sandbox(Settings.load(pool_idle_start_seconds=0)) as sandbox:

        def call(code: str, **arguments: Any) -> Callable[[], Awaitable[None]]:  # noqa: ANN401
            async def once() -> None:
                result = await sandbox.execute(code, **arguments)
                if result.status != "success":
                    raise RuntimeError(result)

            return once

        async def settle() -> None:
            await _refilled(sandbox, "python", sandbox.settings.pool_size)
            await anyio.sleep(SETTLE_SECONDS)

        cases = {
            "api copy, no files": call(COPY),
            "api copy, 1 MiB in + 1 MiB out": call(COPY, files={"in.bin": payload}),
            "api plot, figure closed": call(PLOT + "plt.close('all')\n"),
            "api plot, saved by the program and closed": call(PLOT + "plt.savefig('chart.png')\nplt.close('all')\n"),
            "api plot, one figure returned": call(PLOT),
        }
        for once in cases.values():  # warm every path (imports, page cache) before measuring
            await once()
        for name, once in cases.items():
            rows[name] = percentiles(await atimed(once, count, settle))
    return rows


async def stdio_rows(count: int) -> dict[str, Any]:
    import base64  # noqa: PLC0415 - only here

    payload = base64.b64encode(os.urandom(MIB)).decode("ascii")
    env = {**os.environ, "CODOMYRMEX_SANDBOX_POOL_IDLE_START_SECONDS": "0"}
    params = StdioServerParameters(command=str(SCRIPT), args=["serve"], env=env)
    rows: dict[str, Any] = {}
    async with Client(params, read_timeout_seconds=120) as client:

        def call(arguments: dict[str, Any]) -> Callable[[], Awaitable[None]]:
            async def once() -> None:
                result = await client.call_tool("execute_code", arguments)
                data = result.structured_content
                if result.is_error or data is None or data["status"] != "success":
                    raise RuntimeError(result)

            return once

        async def settle() -> None:
            await anyio.sleep(SETTLE_SECONDS * 3)  # the server's pool refills meanwhile

        cases = {
            "stdio copy, no files": call({"code": COPY}),
            "stdio copy, 1 MiB in + 1 MiB out": call(
                {"code": COPY, "files": [{"path": "in.bin", "content": payload, "encoding": "base64"}]}
            ),
        }
        for once in cases.values():
            await once()
        for name, once in cases.items():
            rows[name] = percentiles(await atimed(once, count, settle))
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 samples a row")
    args = parser.parse_args()
    count = 10 if args.quick else 30
    rows = await api_rows(count) | await stdio_rows(count)

    def extra(base: str, case: str) -> float:
        return float(rows[case]["p50"] - rows[base]["p50"])

    verdicts = {
        "api: 1 MiB in + out, ms over no files (target <= 20)": verdict(
            extra("api copy, no files", "api copy, 1 MiB in + 1 MiB out"), at_most=20
        ),
        "stdio: 1 MiB in + out, ms over no files (target <= 20)": verdict(
            extra("stdio copy, no files", "stdio copy, 1 MiB in + 1 MiB out"), at_most=20
        ),
        "one figure, ms over the plotting code (target <= 150)": verdict(
            extra("api plot, figure closed", "api plot, one figure returned"), at_most=150
        ),
        "one figure, ms over the program saving it itself (no target; the drawing is in both)": verdict(
            extra("api plot, saved by the program and closed", "api plot, one figure returned"), at_most=150
        ),
    }
    print(table("Warm calls, python (ms)", rows))
    print(table("Targets", verdicts))
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    path = results / time.strftime("files-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"rows": rows, "verdicts": verdicts}, indent=2))
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    anyio.run(main)
