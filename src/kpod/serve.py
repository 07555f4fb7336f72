"""``kpod serve MODEL``: an OpenAI-compatible chat-completions server for any local model.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (``stream`` true or false,
``temperature``, ``max_tokens``, ``seed``, ``stop``), ``GET /health``. It binds 127.0.0.1 by
default; ``--api-key-env VAR`` makes it require ``Authorization: Bearer $VAR``.

``--inject-faults RATE`` answers that share of chat requests with a fault (HTTP 429 or 500, or a
connection dropped without an answer), chosen at random: it exists to test clients' retry logic,
kpod's own teacher client first. ``--inject-delay SECONDS`` holds every chat reply that long (a
slow teacher, for tests of timeouts and of concurrent clients). ``--access-log`` prints one line per
request to standard error (``"POST /v1/chat/completions HTTP/1.1" 200``), so a test or a user can
count what the server was asked.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kpod.errors import KpodError
from kpod.teacher.local import LocalChatModel

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        if self.server.access_log:
            super().log_message(format, *args)  # the stdlib's access line on stderr
            sys.stderr.flush()
        else:
            log.debug("%s " + format, self.address_string(), *args)

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def _authorised(self) -> bool:
        if self.server.api_key is None:
            return True
        header = self.headers.get("Authorization", "")
        if secrets.compare_digest(header, f"Bearer {self.server.api_key}"):
            return True
        self._error(401, "invalid API key", "authentication_error")
        return False

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            if self._authorised():
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": self.server.model_id, "object": "model", "owned_by": "kpod"}],
                    },
                )
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        if not self._authorised():
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(length) or b"{}")
            messages = request["messages"]
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in messages
            ):
                raise ValueError("messages must be a list of {role, content} objects")
        except (ValueError, KeyError, TypeError) as err:
            self._error(400, f"bad request: {err}")
            return
        if self.server.delay_s:
            time.sleep(self.server.delay_s)
        fault = self.server.pick_fault()
        if fault == "429":
            self._error(429, "injected fault: rate limited", "rate_limit_error")
            return
        if fault == "500":
            self._error(500, "injected fault: server error", "server_error")
            return
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        kwargs = {
            "temperature": float(request.get("temperature", 0.0) or 0.0),
            "max_tokens": int(request.get("max_tokens") or request.get("max_completion_tokens") or 256),
            "seed": request.get("seed"),
            "stop": [request["stop"]] if isinstance(request.get("stop"), str) else request.get("stop"),
        }
        ident = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        model_id = self.server.model_id
        if request.get("stream"):
            self._stream(messages, kwargs, ident, created, model_id)
            return
        result = self.server.chat_model.chat(messages, **kwargs)
        self._json(
            200,
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens,
                },
            },
        )

    def _stream(
        self, messages: list, kwargs: dict[str, Any], ident: str, created: int, model_id: str
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(delta: dict[str, str], finish: str | None) -> None:
            chunk = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        event({"role": "assistant", "content": ""}, None)
        for piece in self.server.chat_model.stream(messages, **kwargs):
            event({"content": piece}, None)
        event({}, "stop")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        chat_model: LocalChatModel,
        *,
        model_id: str,
        api_key: str | None = None,
        fault_rate: float = 0.0,
        seed: int = 0,
        delay_s: float = 0.0,
        access_log: bool = False,
    ) -> None:
        super().__init__(address, _Handler)
        self.delay_s = delay_s
        self.access_log = access_log
        self.chat_model = chat_model
        self.model_id = model_id
        self.api_key = api_key
        self.fault_rate = fault_rate
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.faults_injected = 0

    def pick_fault(self) -> str | None:
        """``None``, or the fault to answer the current request with: "429", "500" or "drop"."""
        with self._rng_lock:
            if self.fault_rate <= 0 or self._rng.random() >= self.fault_rate:
                return None
            self.faults_injected += 1
            return self._rng.choice(("429", "500", "drop"))


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_id: str | None = None,
    api_key: str | None = None,
    fault_rate: float = 0.0,
    precision: str = "auto",
    delay_s: float = 0.0,
    access_log: bool = False,
) -> None:
    """Load ``model`` and serve it until interrupted."""
    if not 0 <= fault_rate < 1:
        raise KpodError(f"--inject-faults must be in [0, 1), got {fault_rate}")
    if delay_s < 0:
        raise KpodError(f"--inject-delay must be >= 0 seconds, got {delay_s}")
    chat_model = LocalChatModel(model, precision=precision)
    try:
        httpd = ChatServer(
            (host, port),
            chat_model,
            model_id=model_id or model,
            api_key=api_key,
            fault_rate=fault_rate,
            delay_s=delay_s,
            access_log=access_log,
        )
    except OSError as err:
        raise KpodError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    print(f"kpod: serving {model_id or model} at http://{host}:{httpd.server_address[1]}/v1", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
