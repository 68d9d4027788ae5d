"""The console script ``codomyrmex-sandbox``.

    codomyrmex-sandbox [serve]            serve MCP over stdio (the default)
    codomyrmex-sandbox serve --transport http [--host H] [--port P]
                                          serve MCP over streamable HTTP at /mcp
    codomyrmex-sandbox auth new-token NAME
                                          make a bearer token for the HTTP transport
    codomyrmex-sandbox run FILE|-         run code once and print the result
    codomyrmex-sandbox doctor             check the engine, the images and the policy
    codomyrmex-sandbox runtimes build     build the runtime images
    codomyrmex-sandbox config CLIENT      print a client's entry for this server (claude, cursor, claude-code)

Logging is configured here, once, to stderr; stdout belongs to the MCP transport (``serve``) or
to the program's output (``run``) or to the printed entry (``config``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import anyio
import anyio.to_thread

from codomyrmex_sandbox import __version__
from codomyrmex_sandbox.errors import SandboxError

# Each command imports what it needs, when it runs: `--version` and `--help` load none of it,
# and `serve` loads the MCP SDK while the engine starts the first sandbox (see `_serve`).
if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from codomyrmex_sandbox.models import ExecutionResult
    from codomyrmex_sandbox.output import StreamName
    from codomyrmex_sandbox.settings import Settings

EXIT_NOT_RUN = 2
_STATUS_EXIT = {  # by `Status` value
    "timeout": 124,
    "output_limit": 125,
    "memory_limit": 137,
    "cancelled": 130,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command or "serve"
    try:
        from codomyrmex_sandbox.logs import configure_logging  # noqa: PLC0415 - see the imports above
        from codomyrmex_sandbox.settings import Settings  # noqa: PLC0415

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


def _serve_command(settings: Settings, args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    for option, setting in (("transport", "transport"), ("host", "http_host"), ("port", "http_port")):
        if getattr(args, option, None) is not None:
            overrides[setting] = getattr(args, option)
    if getattr(args, "insecure_no_auth", False):
        overrides["insecure_no_auth"] = True
    if overrides:
        from codomyrmex_sandbox.settings import Settings  # noqa: PLC0415 - see the imports above

        settings = Settings.load(args.config, **overrides)
    if settings.transport == "http":
        from codomyrmex_sandbox.http_server import check_http_settings  # noqa: PLC0415 - only HTTP needs it

        check_http_settings(settings)  # before anything starts: a refused configuration starts nothing
    anyio.run(_serve, settings)
    # Every sandbox is removed and every record written. Worker threads may still be blocked (on
    # stdin from a client that never closed it, after a signal; on the engine's answer for a sandbox
    # already removed), and the interpreter's shutdown would join them: an mcp 1.x client kills a
    # server that has not exited 2 s after it closed stdin, so nothing may hold the exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_command(settings: Settings, args: argparse.Namespace) -> int:
    code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    stdin = Path(args.stdin_file).read_text(encoding="utf-8") if args.stdin_file else None
    files: dict[str, bytes] = {}
    for spec in args.upload:
        local, _, inside = spec.partition("=")
        files[inside or Path(local).name] = Path(local).read_bytes()
    return anyio.run(_run, settings, args, code, stdin, files)


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
    serve = commands.add_parser("serve", help="serve MCP over stdio (the default) or streamable HTTP")
    serve.add_argument(  # also after the command; SUPPRESS keeps a --config given before it
        "--config", type=Path, default=argparse.SUPPRESS, help="a TOML settings file (as before the command)"
    )
    serve.add_argument("--transport", choices=("stdio", "http"), help="stdio (default) or http (serves /mcp)")
    serve.add_argument("--host", help="HTTP: the address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP: the port (default 8000; 0 picks a free one)")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="HTTP: no authentication, every caller is 'anonymous'; loopback addresses only, for development",
    )
    auth = commands.add_parser("auth", help="manage bearer tokens for the HTTP transport")
    auth_commands = auth.add_subparsers(dest="auth_command", metavar="ACTION", required=True)
    token = auth_commands.add_parser(
        "new-token", help="print a new random token (once) and the line that admits it to auth_tokens_file"
    )
    token.add_argument("name", help="the principal's name (letters, digits, '.', '_', '@', '-'; up to 64)")
    token.add_argument(
        "--append", type=Path, metavar="FILE", help="also append the line to FILE (created with mode 0600)"
    )
    run = commands.add_parser("run", help="run code once and print the result")
    run.add_argument("file", help="the program to run, or - for standard input")
    run.add_argument("--language", "-l", default="python", help="the runtime (default: python)")
    run.add_argument("--timeout", type=float, help="wall-clock limit in seconds")
    run.add_argument("--memory", type=int, help="memory limit in MiB")
    run.add_argument("--stdin", dest="stdin_file", help="a file whose contents are the program's stdin")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument(
        "--file",
        dest="upload",
        action="append",
        default=[],
        metavar="LOCAL[=PATH]",
        help="upload a local file into the working directory, as PATH (default: its name); repeatable",
    )
    run.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="save the files and figures that come back into DIR (never anywhere outside it)",
    )
    commands.add_parser("doctor", help="check the engine, the runtime images and the policy")
    client = commands.add_parser("config", help="print the entry that adds this server to an MCP client")
    client.add_argument("client", choices=CLIENTS, help="the client: Claude Desktop, Cursor or Claude Code")
    client.add_argument(
        "--config",
        dest="server_config",
        type=Path,
        metavar="FILE",
        help="a TOML settings file for the server to start with",
    )
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


async def _serve(settings: Settings) -> None:
    """Serve until stdin closes or a signal arrives.

    Either way the calls in flight are cancelled (their sandboxes killed, their audit records
    finished as cancelled) and the Sandbox closes, removing every container, before this returns.

    Start-up overlaps its two slow parts: the MCP SDK, most of the time to the first answer (about
    a second on two cores), is imported in a worker thread while the Sandbox opens here (connect,
    sweep what a dead server left, then start the first warm sandbox, which the engine does in
    processes of its own), so that the first call finds that sandbox ready.
    """
    from codomyrmex_sandbox.service import Sandbox  # noqa: PLC0415 - see the imports above

    sandbox = Sandbox(settings)  # before the thread starts: it imports the backend, here
    if settings.transport == "http":
        from codomyrmex_sandbox.http_server import serve_http  # noqa: PLC0415 - only HTTP needs it

        async with sandbox:  # closing it removes every sandbox, after the drain
            try:
                await serve_http(sandbox)  # its signal receiver is gone when it returns
            finally:
                _ignore_stop_signals()
        return
    with ThreadPoolExecutor(1, thread_name_prefix="import-mcp") as imports:
        stdio = imports.submit(importlib.import_module, "codomyrmex_sandbox.stdio")
        async with sandbox:
            try:
                async with anyio.create_task_group() as tg:

                    async def stop_on_signal(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
                        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                            task_status.started()
                            async for _ in signals:
                                tg.cancel_scope.cancel()
                                return

                    await tg.start(stop_on_signal)  # from here on, a stop signal is never missed
                    # raises what the import raised
                    await anyio.to_thread.run_sync(stdio.result, abandon_on_cancel=True)
                    from codomyrmex_sandbox.stdio import serve_stdio  # noqa: PLC0415 - imported by now

                    await serve_stdio(sandbox)
                    tg.cancel_scope.cancel()
            finally:
                _ignore_stop_signals()  # after the receiver is gone (leaving, it restores the default action)


def _ignore_stop_signals() -> None:
    """Once serving is over, the Sandbox closes (killing and removing every sandbox), which must
    finish: a second SIGTERM would otherwise kill the process halfway (the receivers that handled the
    first are gone, and the default action is back)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


async def _run(
    settings: Settings, args: argparse.Namespace, code: str, stdin: str | None, files: dict[str, bytes]
) -> int:
    from codomyrmex_sandbox.service import Sandbox  # noqa: PLC0415 - see the imports above

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
            files=files or None,
            on_output=None if args.json else echo,
        )
    if args.out is not None:
        from codomyrmex_sandbox.saving import save_returned  # noqa: PLC0415 - see the imports above

        for line in save_returned(result, args.out):
            sys.stderr.write(f"[codomyrmex-sandbox] {line}\n")
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
    from codomyrmex_sandbox.runtimes import load_runtimes  # noqa: PLC0415 - see the imports above

    runtimes = load_runtimes(settings.runtimes_dir, args.languages or settings.languages)

    def report(line: str) -> None:
        sys.stderr.write(f"[runtimes] {line}\n")
        sys.stderr.flush()

    versions = build_runtimes(settings, runtimes, report, force=args.force, offline=args.offline, prune=args.prune)
    for name, version in sorted(versions.items()):
        sys.stdout.write(f"{name}: {version}\n")
    return 0


CLIENTS = ("claude", "cursor", "claude-code")
SERVER_NAME = "codomyrmex-sandbox"
_WHERE = {
    "claude": "merge this into claude_desktop_config.json (Claude Desktop: Settings > Developer > Edit Config)",
    "cursor": "merge this into ~/.cursor/mcp.json, or into .cursor/mcp.json in a project",
    "claude-code": "run this command (`claude mcp add --scope user ...` makes the server available in every project)",
}


def _config_command(_settings: Settings, args: argparse.Namespace) -> int:
    """Print the entry that adds this server to a client on stdout; where it goes on stderr."""
    from codomyrmex_sandbox.settings import Settings  # noqa: PLC0415 - see the imports above

    config_file: Path | None = args.server_config or args.config
    server_args: list[str] = []
    if config_file is not None:
        config_file = config_file.expanduser().resolve()  # clients start servers in a directory of their own
        Settings.load(config_file)  # a file the server could not start with is refused now, with the reason
        server_args = ["--config", str(config_file)]
    sys.stdout.write(client_config(args.client, console_script_path(), server_args))
    sys.stderr.write(f"codomyrmex-sandbox: {_WHERE[args.client]}\n")
    return 0


def client_config(client: str, command: Path, args: list[str]) -> str:
    """The text that adds this server, started as ``command args``, to ``client`` (one of `CLIENTS`)."""
    import json  # noqa: PLC0415 - only this command needs it
    import shlex  # noqa: PLC0415 - only this command needs it

    if client == "claude-code":
        return shlex.join(["claude", "mcp", "add", SERVER_NAME, "--", str(command), *args]) + "\n"
    if client not in CLIENTS:
        raise ValueError(f"unknown client {client!r}; choose one of {', '.join(CLIENTS)}")
    # Claude Desktop and Cursor read the same shape.
    return json.dumps({"mcpServers": {SERVER_NAME: {"command": str(command), "args": args}}}, indent=2) + "\n"


def console_script_path() -> Path:
    """This installation's console script, absolute: the one beside the running interpreter, else on PATH."""
    import shutil  # noqa: PLC0415 - only this command needs it

    from codomyrmex_sandbox.errors import ConfigurationError  # noqa: PLC0415 - see the imports above

    script = Path(sys.executable).parent / "codomyrmex-sandbox"
    if not script.is_file():
        found = shutil.which("codomyrmex-sandbox")
        if found is None:
            raise ConfigurationError(
                f"the codomyrmex-sandbox console script is neither beside {sys.executable} nor on PATH; "
                "install the package (`pip install -e .` in the clone) and run `config` through that script"
            )
        script = Path(found)
    return script.resolve()


def _auth_command(_settings: Settings, args: argparse.Namespace) -> int:
    """`auth new-token NAME`: the token on stdout's first line, the file's line on the second."""
    from codomyrmex_sandbox.tokens import new_token  # noqa: PLC0415 - only this command needs it

    token, line = new_token(args.name)
    if args.append is not None:
        fd = os.open(args.append, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as tokens:
            tokens.write(line + "\n")
    sys.stdout.write(f"{token}\n{line}\n")
    where = f"appended to {args.append}" if args.append is not None else "add the second line to auth_tokens_file"
    sys.stderr.write(
        f"codomyrmex-sandbox: the first line is the bearer token for {args.name!r}; it is shown only now and "
        f"never stored (only its SHA-256 is). {where}; clients send `Authorization: Bearer <token>`.\n"
    )
    return 0


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "serve": _serve_command,
    "auth": _auth_command,
    "run": _run_command,
    "doctor": _doctor_command,
    "runtimes": _runtimes,
    "config": _config_command,
}
