"""A real HTTP server speaking the chat-completions wire format, with scripted answers, for
the model reviewer's tests (loopback only).

Each request takes the next script entry (the last one repeats):
  ("answer", {...})      a completion whose content is that object as JSON
  ("content", "text")    a completion whose content is the text as given
  ("refusal", "why")     a completion with a refusal and no content
  ("status", 500)        that status, a JSON error body
  ("sleep", seconds)     nothing for that long, then an allow answer
  ("delayed", (s, {...})) nothing for s seconds, then a completion with that object
  ("trickle", seconds)   the headers at once, then the body one byte per `seconds`
  ("body", b"...")       those bytes as the whole 200 body
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from typing import Any


def completion(content: str | None, refusal: str | None = None) -> bytes:
    return json.dumps({
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
        "model": "test-model",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": content, "refusal": refusal}}],
    }).encode()


ALLOW = {"risk_level": "low", "outcome": "allow", "rationale": "a routine documentation host"}


class ModelServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.script: list[tuple[str, Any]] = [("answer", ALLOW)]
        self.received: list[dict[str, Any]] = []
        self.headers_seen: list[dict[str, str]] = []
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_step(self) -> tuple[str, Any]:
        with self._lock:
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ModelServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length))
        self.server.received.append(body)
        self.server.headers_seen.append(dict(self.headers))
        if self.path != "/v1/chat/completions":
            self._send(404, b'{"error": "not found"}')
            return
        kind, value = self.server.next_step()
        if kind == "answer":
            self._send(200, completion(json.dumps(value)))
        elif kind == "content":
            self._send(200, completion(value))
        elif kind == "refusal":
            self._send(200, completion(None, value))
        elif kind == "status":
            self._send(value, b'{"error": {"message": "scripted failure"}}')
        elif kind == "sleep":
            time.sleep(value)
            self._send(200, completion(json.dumps(ALLOW)))
        elif kind == "delayed":
            time.sleep(value[0])
            self._send(200, completion(json.dumps(value[1])))
        elif kind == "body":
            self._send(200, value)
        elif kind == "trickle":
            data = completion(json.dumps(ALLOW))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for index in range(len(data)):
                    self.wfile.write(data[index:index + 1])
                    self.wfile.flush()
                    time.sleep(value)
            except OSError:
                pass  # the client gave up, as it should

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
