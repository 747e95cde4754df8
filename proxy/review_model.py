"""The model reviewer: auto-review's questions put to an OpenAI-compatible model server."""

from __future__ import annotations

from typing import Any

from agent_egress.policy.engine import AutoReviewPolicy
from agent_egress.policy.review import ReviewAnswer
from agent_egress.policy.review_prompt import SYSTEM_PROMPT, data_message

from .model_client import ChatModel
from .secretstore import read_secret


class ReviewModel:
    """Asks the configured model about one held request; its answer is a ReviewAnswer or a
    ModelError (model_client)."""

    def __init__(self, settings: AutoReviewPolicy) -> None:
        api_key = read_secret("auto-review api_key", settings.api_key) if (
            settings.api_key) else None  # SecretError: said in an event, the model is not used
        self.model = settings.model
        self.chat = ChatModel(settings.model_url, settings.model, api_key, settings.timeout)

    async def review(self, data: dict[str, Any]) -> ReviewAnswer:
        return await self.chat.ask(SYSTEM_PROMPT, data_message(data), ReviewAnswer, "review")

    async def close(self) -> None:
        await self.chat.close()
