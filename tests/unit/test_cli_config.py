"""``codomyrmex-sandbox config CLIENT``: the exact entry a client needs, with this installation's path."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from codomyrmex_sandbox.cli import main

SCRIPT = (Path(sys.executable).parent / "codomyrmex-sandbox").resolve()


@pytest.fixture(autouse=True)
def _logging_left_as_it_was() -> Iterator[None]:
    """`main` configures logging onto pytest's captured stderr, which closes after the test: undo it,
    or every later test that logs writes to a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configured = structlog.is_configured()
    saved = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    if configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


def config(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["config", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("client", ["claude", "cursor"])
def test_claude_desktop_and_cursor_get_valid_json_naming_this_installations_console_script(capsys, client):
    status, out, err = config(capsys, client)

    assert status == 0
    entry = json.loads(out)
    assert entry == {"mcpServers": {"codomyrmex-sandbox": {"command": str(SCRIPT), "args": []}}}
    command = Path(entry["mcpServers"]["codomyrmex-sandbox"]["command"])
    assert command.is_absolute()
    assert command.is_file()
    assert ("mcp.json" if client == "cursor" else "claude_desktop_config.json") in err


def test_claude_code_gets_the_claude_mcp_add_command_line(capsys):
    status, out, _ = config(capsys, "claude-code")

    assert status == 0
    assert out.endswith("\n")
    assert out.count("\n") == 1
    assert shlex.split(out) == ["claude", "mcp", "add", "codomyrmex-sandbox", "--", str(SCRIPT)]


def test_a_settings_file_passes_through_as_an_absolute_path_quoted_for_the_shell(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "my settings"
    folder.mkdir()
    (folder / "sand box.toml").write_text('profile = "strict"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # a relative path: the client starts the server elsewhere

    _, desktop, _ = config(capsys, "claude", "--config", "my settings/sand box.toml")
    _, code, _ = config(capsys, "claude-code", "--config", "my settings/sand box.toml")

    absolute = str(folder / "sand box.toml")
    assert json.loads(desktop)["mcpServers"]["codomyrmex-sandbox"]["args"] == ["--config", absolute]
    assert shlex.split(code)[-2:] == ["--config", absolute]
    assert f"'{absolute}'" in code


def test_the_global_config_option_is_passed_through_too(capsys, tmp_path):
    settings = tmp_path / "sandbox.toml"
    settings.write_text('languages = ["python"]\n', encoding="utf-8")

    status = main(["--config", str(settings), "config", "cursor"])
    entry = json.loads(capsys.readouterr().out)

    assert status == 0
    assert entry["mcpServers"]["codomyrmex-sandbox"]["args"] == ["--config", str(settings)]


def test_a_console_script_path_with_spaces_is_quoted_for_the_shell(capsys, tmp_path, monkeypatch):
    bin_dir = tmp_path / "my venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "codomyrmex-sandbox").write_text("#!/bin/sh\n", encoding="utf-8")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))

    _, code, _ = config(capsys, "claude-code")
    _, desktop, _ = config(capsys, "claude")

    script = str((bin_dir / "codomyrmex-sandbox").resolve())
    assert shlex.split(code)[-1] == script
    assert shlex.quote(script) in code
    assert json.loads(desktop)["mcpServers"]["codomyrmex-sandbox"]["command"] == script


def test_a_settings_file_the_server_could_not_read_is_refused_with_the_reason(capsys, tmp_path):
    status, out, err = config(capsys, "claude", "--config", str(tmp_path / "missing.toml"))

    assert status == 2
    assert out == ""
    assert "cannot read config file" in err
    assert "missing.toml" in err


def test_invalid_settings_in_the_file_are_refused_with_what_to_fix(capsys, tmp_path):
    settings = tmp_path / "sandbox.toml"
    settings.write_text("pool_size = -1\n", encoding="utf-8")

    status, out, err = config(capsys, "claude-code", "--config", str(settings))

    assert status == 2
    assert out == ""
    assert "pool_size" in err


def test_an_unknown_client_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["config", "vscode"])

    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "vscode" in err
    assert "claude-code" in err


def test_without_a_console_script_it_says_how_to_install_one(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))

    status, out, err = config(capsys, "claude")

    assert status == 2
    assert out == ""
    assert "pip install -e ." in err
