"""A scripted stand-in for a hosted model, served on loopback, so that agent libraries run their own loop.

The README's snippets for pydantic-ai, openai-agents and google-genai hand the tool to an agent that a
model drives. Here the model is this server: the library sends it the tool declarations and every tool
result, exactly as it would send them to OpenAI or Gemini, and the server answers with the tool calls a
test scripted, then with a final text. The test then checks what the model was sent: the tool's
declaration (strict or not), and each result the library forwarded (the program's output, or the
library's own "An error occurred while running the tool" when the call failed on the client side).

Two wire APIs are spoken, enough for the libraries' non-streaming calls:
- OpenAI Responses (``POST {OPENAI_BASE_URL}/responses``): openai-agents, and pydantic-ai's ``openai:``;
- Gemini ``generateContent`` (``POST {GOOGLE_GEMINI_BASE_URL}/v1beta/models/M:generateContent``).

It listens on 127.0.0.1 only, and answers only what it is sent.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FINAL_TEXT = "The sandbox answered."


@dataclass
class Turn:
    """One request the model received: the tools it was offered and the tool results so far."""

    api: str
    tools: list[dict[str, Any]]
    tool_results: list[str]
    body: dict[str, Any]


@dataclass
class FakeModel:
    """Calls ``execute_code`` with each of ``calls`` in turn (one per model turn), then answers `FINAL_TEXT`."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tool_name: str = "execute_code"
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the fake model is not serving"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def tool_results(self) -> list[str]:
        """Every tool result the library sent back to the model, in order (from its last request)."""
        return self.turns[-1].tool_results if self.turns else []

    def tools_offered(self) -> list[dict[str, Any]]:
        """The tool declarations of the first request."""
        assert self.turns, "the library never called the model"
        return self.turns[0].tools

    def start(self) -> None:
        model = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                    answer = model.answer(self.path, body)
                except Exception as exc:  # noqa: BLE001 - reported to the test, and to the library as a 500
                    model.errors.append(f"{self.path}: {exc!r}")
                    self._send(500, {"error": {"message": repr(exc), "code": 500}})
                    return
                self._send(200, answer)

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it so
                """Quiet: the test reports what matters."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- the model's side -----------------------------------------------------------------------

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if path.rstrip("/").endswith("/responses"):
            turn = Turn("openai-responses", body.get("tools") or [], _responses_tool_results(body), body)
            self.turns.append(turn)
            return self._responses_answer(len(turn.tool_results), body)
        if path.split("?", maxsplit=1)[0].endswith(":generateContent"):
            tools = [d for tool in body.get("tools") or [] for d in tool.get("functionDeclarations") or []]
            turn = Turn("gemini", tools, _gemini_tool_results(body), body)
            self.turns.append(turn)
            return self._gemini_answer(len(turn.tool_results))
        message = f"the fake model does not serve {path}"
        raise ValueError(message)

    def _responses_answer(self, done: int, body: dict[str, Any]) -> dict[str, Any]:
        if done < len(self.calls):
            output: dict[str, Any] = {
                "type": "function_call",
                "id": f"fc_{done}",
                "call_id": f"call_{done}",
                "name": self.tool_name,
                "arguments": json.dumps(self.calls[done]),
                "status": "completed",
            }
        else:
            output = {
                "type": "message",
                "id": f"msg_{done}",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": FINAL_TEXT, "annotations": []}],
            }
        return {
            "id": f"resp_{len(self.turns)}",
            "object": "response",
            "created_at": 0,
            "status": "completed",
            "model": body.get("model") or "fake",
            "output": [output],
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": 1,
                "output_tokens": 1,
                "total_tokens": 2,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    def _gemini_answer(self, done: int) -> dict[str, Any]:
        if done < len(self.calls):
            part: dict[str, Any] = {"functionCall": {"name": self.tool_name, "args": self.calls[done]}}
        else:
            part = {"text": FINAL_TEXT}
        return {
            "candidates": [{"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2},
            "modelVersion": "fake",
        }


def _responses_tool_results(body: dict[str, Any]) -> list[str]:
    items = body.get("input")
    if not isinstance(items, list):
        return []
    results = []
    for item in items:
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            output = item.get("output")
            results.append(output if isinstance(output, str) else json.dumps(output))
    return results


def _gemini_tool_results(body: dict[str, Any]) -> list[str]:
    return [
        json.dumps(part["functionResponse"].get("response"))
        for content in body.get("contents") or []
        for part in content.get("parts") or []
        if "functionResponse" in part
    ]
