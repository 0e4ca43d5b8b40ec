"""HTTP client of the dashboard: health, the stats endpoint and streaming chat completions."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx

logger = logging.getLogger(__name__)

STATS_TIMEOUT_S = 2.0  # the stats panels refresh every 1-2 s, so a slower response counts as an outage
CHAT_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=10.0, pool=5.0)  # read: max gap between tokens


class ServerUnavailable(RuntimeError):
    """The server did not respond, or responded with an error status."""


class ServerClient:
    """Calls one Flash-Serve server at `base_url` (for example http://127.0.0.1:8000)."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def health(self) -> None:
        """Raise ServerUnavailable unless GET /health returns 200."""
        self._get("/health", {})

    def models(self) -> list[str]:
        """GET /v1/models: the names the server accepts as `model`."""
        response = self._get("/v1/models", {})
        try:
            return [str(entry["id"]) for entry in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as error:
            raise ServerUnavailable(f"GET {self.base_url}/v1/models returned an invalid body: {error!r}") from None

    def stats(self, since_step: int) -> dict:
        """GET /v1/stats: the server's state now and the step records after `since_step`."""
        response = self._get("/v1/stats", {"since_step": since_step})
        try:
            return response.json()
        except ValueError as error:
            raise ServerUnavailable(f"GET {self.base_url}/v1/stats returned invalid JSON: {error}") from None

    def _get(self, path: str, params: dict) -> httpx.Response:
        url = self.base_url + path
        try:
            response = httpx.get(url, params=params, timeout=STATS_TIMEOUT_S)
        except httpx.HTTPError as error:
            raise ServerUnavailable(f"GET {url} failed: {error or type(error).__name__}") from None
        if response.status_code != 200:
            raise ServerUnavailable(f"GET {url} returned HTTP {response.status_code}: {response.text[:200]}")
        return response

    def stream_chat(
        self, model: str, messages: list[dict], max_tokens: int, temperature: float
    ) -> Iterator[str]:
        """POST /v1/chat/completions with stream=true and yield the text of each content delta.

        Raises ServerUnavailable when the request fails or the server responds with an error status.
        """
        url = self.base_url + "/v1/chat/completions"
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
        }
        try:
            with httpx.stream("POST", url, json=body, timeout=CHAT_TIMEOUT) as response:
                if response.status_code != 200:
                    response.read()
                    raise ServerUnavailable(
                        f"POST {url} returned HTTP {response.status_code}: {response.text[:300]}"
                    )
                yield from _content_deltas(response.iter_lines())
        except httpx.HTTPError as error:
            raise ServerUnavailable(f"POST {url} failed: {error or type(error).__name__}") from None


def _content_deltas(lines: Iterator[str]) -> Iterator[str]:
    """Parse server-sent events of chat completion chunks, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError as error:
            raise ServerUnavailable(f"the server sent an invalid stream chunk {data[:200]!r}: {error}") from None
        if "error" in chunk:
            raise ServerUnavailable(f"the server reported an error while streaming: {chunk['error']}")
        for choice in chunk.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content
