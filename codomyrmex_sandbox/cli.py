"""The console script ``codomyrmex-sandbox``.

    codomyrmex-sandbox [serve]            serve MCP over stdio (the default)
    codomyrmex-sandbox run FILE|-         run code once and print the result
    codomyrmex-sandbox doctor             check the engine, the images and the policy
    codomyrmex-sandbox runtimes build     build the runtime images

Logging is configured here, once, to stderr; stdout belongs to the MCP transport (``serve``) or
to the program's output (``run``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import anyio

from codomyrmex_sandbox import __version__
from codomyrmex_sandbox.errors import SandboxError
from codomyrmex_sandbox.logs import configure_logging
from codomyrmex_sandbox.models import ExecutionResult, Status
from codomyrmex_sandbox.output import StreamName
from codomyrmex_sandbox.runtimes import load_runtimes
from codomyrmex_sandbox.service import Sandbox
from codomyrmex_sandbox.settings import Settings

EXIT_NOT_RUN = 2
_STATUS_EXIT = {
    Status.TIMEOUT: 124,
    Status.OUTPUT_LIMIT: 125,
    Status.MEMORY_LIMIT: 137,
    Status.CANCELLED: 130,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command or "serve"
    try:
        settings = Settings.load(args.config)
        configure_logging(settings.log_level if command == "serve" or args.verbose else "warning")
        return _COMMANDS[command](settings, args)
    except SandboxError as exc:
        sys.stderr.write(f"codomyrmex-sandbox: {exc}\n")
        return EXIT_NOT_RUN
    except OSError as exc:
        sys.stderr.write(f"codomyrmex-sandbox: {exc.strerror}: {exc.filename}\n")
        return EXIT_NOT_RUN
    except KeyboardInterrupt:
        return 130


def _serve_command(settings: Settings, _args: argparse.Namespace) -> int:
    stopped_by_signal = anyio.run(_serve, settings)
    if stopped_by_signal:
        # Every sandbox is removed and every record written; a worker thread may still be blocked
        # reading stdin from a client that never closed it, and must not hold the exit.
        sys.stderr.flush()
        os._exit(0)
    return 0


def _run_command(settings: Settings, args: argparse.Namespace) -> int:
    code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    stdin = Path(args.stdin_file).read_text(encoding="utf-8") if args.stdin_file else None
    return anyio.run(_run, settings, args, code, stdin)


def _doctor_command(settings: Settings, _args: argparse.Namespace) -> int:
    from codomyrmex_sandbox.doctor import doctor  # noqa: PLC0415 - keeps start-up light

    return anyio.run(doctor, settings, sys.stdout)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codomyrmex-sandbox", description="Run untrusted code in fresh, hardened sandboxes."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", type=Path, help="a TOML settings file (environment variables override it)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at the configured level on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="serve MCP over stdio (the default)")
    run = commands.add_parser("run", help="run code once and print the result")
    run.add_argument("file", help="the program to run, or - for standard input")
    run.add_argument("--language", "-l", default="python", help="the runtime (default: python)")
    run.add_argument("--timeout", type=float, help="wall-clock limit in seconds")
    run.add_argument("--memory", type=int, help="memory limit in MiB")
    run.add_argument("--stdin", dest="stdin_file", help="a file whose contents are the program's stdin")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    commands.add_parser("doctor", help="check the engine, the runtime images and the policy")
    runtimes = commands.add_parser("runtimes", help="manage runtime images")
    runtime_commands = runtimes.add_subparsers(dest="runtimes_command", metavar="ACTION", required=True)
    build = runtime_commands.add_parser("build", help="build every runtime image")
    build.add_argument("--force", action="store_true", help="rebuild images that are up to date")
    build.add_argument("--offline", action="store_true", help="never pull: bootstrap the base image locally")
    build.add_argument(
        "--prune", action="store_true", help="then untag images that earlier recipes of these runtimes built"
    )
    build.add_argument("languages", nargs="*", help="only these runtimes (default: all)")
    return parser


async def _serve(settings: Settings) -> bool:
    """Serve until stdin closes (returns False) or a signal arrives (returns True).

    Either way the calls in flight are cancelled (their sandboxes killed, their audit records
    finished as cancelled) and the Sandbox closes, removing every container, before this returns.
    """
    from codomyrmex_sandbox.stdio import serve_stdio  # noqa: PLC0415 - the MCP SDK loads only to serve

    signalled = False
    async with Sandbox(settings) as sandbox, anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            nonlocal signalled
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for _ in signals:
                    signalled = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(stop_on_signal)
        await serve_stdio(sandbox)
        tg.cancel_scope.cancel()
    return signalled


async def _run(settings: Settings, args: argparse.Namespace, code: str, stdin: str | None) -> int:

    async def echo(stream: StreamName, text: str) -> None:
        target: TextIO = sys.stdout if stream == "stdout" else sys.stderr
        target.write(text)
        target.flush()

    async with Sandbox(settings) as sandbox:
        result = await sandbox.execute(
            code,
            language=args.language,
            stdin=stdin,
            timeout_seconds=args.timeout,
            memory_mb=args.memory,
            on_output=None if args.json else echo,
        )
    if args.json:
        sys.stdout.write(result.model_dump_json(indent=2) + "\n")
    else:
        _print_summary(result)
    return exit_status(result)


def _print_summary(result: ExecutionResult) -> None:
    if result.stdout and not result.stdout.endswith("\n"):
        sys.stdout.write("\n")
    lines = [result.render_text().splitlines()[0]]
    if result.return_value is not None:
        lines.append(f"return value: {result.return_value}")
    for name, cut in (("stdout", result.stdout_truncated), ("stderr", result.stderr_truncated)):
        if cut:
            lines.append(f"{name} was truncated at the output cap")
    sys.stderr.write("".join(f"[codomyrmex-sandbox] {line}\n" for line in lines))


def exit_status(result: ExecutionResult) -> int:
    """The CLI's exit status mirrors the result: the program's own code, or a fixed code per limit."""
    if result.status in _STATUS_EXIT:
        return _STATUS_EXIT[result.status]
    if result.exit_code is not None:
        return result.exit_code
    if result.signal is not None:
        try:
            return 128 + signal.Signals[result.signal].value
        except KeyError:
            return 128
    return 1


def _runtimes(settings: Settings, args: argparse.Namespace) -> int:
    from codomyrmex_sandbox.backends.docker.images import build_runtimes  # noqa: PLC0415 - only this command needs it

    runtimes = load_runtimes(settings.runtimes_dir, args.languages or settings.languages)

    def report(line: str) -> None:
        sys.stderr.write(f"[runtimes] {line}\n")
        sys.stderr.flush()

    versions = build_runtimes(settings, runtimes, report, force=args.force, offline=args.offline, prune=args.prune)
    for name, version in sorted(versions.items()):
        sys.stdout.write(f"{name}: {version}\n")
    return 0


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "serve": _serve_command,
    "run": _run_command,
    "doctor": _doctor_command,
    "runtimes": _runtimes,
}
