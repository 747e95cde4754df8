"""A client for an OpenAI-compatible chat-completions server (llama.cpp, Ollama, vLLM, a
hosted API) that returns only answers validated against a schema.

Anything else is a ModelError: a transport error, a status other than 200, an overall
deadline passed (a server trickling bytes is cut at the deadline, not per read), an answer
over the size limit, a refusal, text that is not JSON, or JSON outside the schema.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

MAX_RESPONSE_BYTES = 256 * 1024


class ModelError(Exception):
    """The model gave no usable answer; ``code`` says which way it failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        # unavailable | status | timeout | too_large | refusal | malformed | schema
        self.code = code


class ChatModel:
    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 20.0) -> None:
        self.url = f"{base_url.rstrip('/')}/chat/completions"
        self.model = model
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # trust_env=False: the proxy's own proxy and CA variables are not the model's route.
        self._client = httpx.AsyncClient(headers=headers, trust_env=False,
                                         timeout=httpx.Timeout(timeout))

    async def ask[A: BaseModel](self, system: str, user: str, answer: type[A], name: str) -> A:
        body = {
            "model": self.model, "temperature": 0, "stream": False,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": name, "strict": True, "schema": answer.model_json_schema()}},
        }
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self._post(body)
        except TimeoutError:
            raise ModelError("timeout", f"no answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise ModelError("unavailable", f"{type(exc).__name__}: {exc}") from None
        return _parse(raw, answer)

    async def _post(self, body: dict[str, Any]) -> bytes:
        async with self._client.stream("POST", self.url, json=body) as response:
            if response.status_code != 200:
                raise ModelError("status", f"the model server answered {response.status_code}")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_RESPONSE_BYTES:
                    raise ModelError("too_large", f"the answer is over {MAX_RESPONSE_BYTES} "
                                                  "bytes")
            return bytes(data)

    async def close(self) -> None:
        await self._client.aclose()


def _parse[A: BaseModel](raw: bytes, answer: type[A]) -> A:
    try:
        message = json.loads(raw)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ModelError("malformed", "not a chat-completions response") from None
    if not isinstance(message, dict):
        raise ModelError("malformed", "not a chat-completions response")
    if message.get("refusal"):
        raise ModelError("refusal", "the model refused to answer")
    content = message.get("content")
    if not isinstance(content, str):
        raise ModelError("malformed", "the answer has no text content")
    try:
        return answer.model_validate_json(content, strict=True)
    except ValidationError as exc:
        kind = "malformed" if any(e["type"] == "json_invalid" for e in exc.errors()) else (
            "schema")
        raise ModelError(kind, f"the answer does not match the schema ({exc.error_count()} "
                               "errors)") from None
