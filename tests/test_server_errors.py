"""Client mistakes get 400 (404 for an unknown model) in OpenAI's error shape, never a 5xx, and
the server keeps serving: every case is followed by a good request that must succeed."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_fixtures import MICRO_NAME, MICRO_OPTIONS, micro_server  # noqa: F401

MAX_MODEL_LEN = MICRO_OPTIONS["max_model_len"]
GOOD = {"model": MICRO_NAME, "prompt": "good", "max_tokens": 3, "temperature": 0}

COMPLETION_CASES = {
    "unknown model": ({"model": "gpt-nothing", "prompt": "x"}, 404, "gpt-nothing"),
    "missing prompt": ({"model": MICRO_NAME}, 400, "prompt"),
    "missing model": ({"prompt": "x"}, 400, "model"),
    "temperature not a number": ({**GOOD, "temperature": "hot"}, 400, "temperature"),
    "negative temperature": ({**GOOD, "temperature": -1}, 400, "temperature"),
    "top_p zero": ({**GOOD, "top_p": 0}, 400, "top_p"),
    "top_k below -1": ({**GOOD, "top_k": -5}, 400, "top_k"),
    "max_tokens zero": ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens fractional": ({**GOOD, "max_tokens": 2.5}, 400, "max_tokens"),
    "min_tokens above max_tokens": ({**GOOD, "min_tokens": 9}, 400, "min_tokens"),
    "n zero": ({**GOOD, "n": 0}, 400, "n must be"),
    "logprobs above 5": ({**GOOD, "logprobs": 6}, 400, "logprobs"),
    "echo with logprobs": ({**GOOD, "echo": True, "logprobs": 1}, 400, "echo"),
    "stop not strings": ({**GOOD, "stop": [1, 2]}, 400, "stop"),
    "empty prompt list": ({**GOOD, "prompt": []}, 400, "prompt"),
    "empty prompt string": ({**GOOD, "prompt": ""}, 400, "empty"),
    "token id outside vocabulary": ({**GOOD, "prompt": [5, 100000]}, 400, "vocabulary"),
    "negative token id": ({**GOOD, "prompt": [-1, 5]}, 400, "vocabulary"),
    "prompt longer than max_model_len": (
        {**GOOD, "prompt": "x" * (MAX_MODEL_LEN + 10)}, 400, f"max_model_len={MAX_MODEL_LEN}"),
    "prompt plus max_tokens over max_model_len": (
        {**GOOD, "prompt": "abc", "max_tokens": MAX_MODEL_LEN}, 400, f"exceeds max_model_len={MAX_MODEL_LEN}"),
    "overflow in second prompt": (
        {**GOOD, "prompt": ["ok", "x" * (MAX_MODEL_LEN + 1)]}, 400, "prompt 1:"),
    "overflow while streaming": (
        {**GOOD, "prompt": "x" * (MAX_MODEL_LEN + 1), "stream": True}, 400, "max_model_len"),
    "stream_options without stream": ({**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    "frequency_penalty": ({**GOOD, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    "suffix": ({**GOOD, "suffix": "end"}, 400, "suffix"),
}

CHAT_GOOD = {"model": MICRO_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
CHAT_CASES = {
    "no messages": ({**CHAT_GOOD, "messages": []}, 400, "messages"),
    "unknown role": ({**CHAT_GOOD, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    "image part": ({**CHAT_GOOD, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "image_url"),
    "top_logprobs without logprobs": ({**CHAT_GOOD, "top_logprobs": 2}, 400, "top_logprobs"),
    "top_logprobs above 20": ({**CHAT_GOOD, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    "unknown model": ({**CHAT_GOOD, "model": "other"}, 404, "other"),
    "max_completion_tokens over max_model_len": (
        {**CHAT_GOOD, "max_completion_tokens": MAX_MODEL_LEN}, 400, "max_model_len"),
}


def assert_openai_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert fragment in error["message"] or fragment == error["param"], error


def assert_serves(server) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json=GOOD, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("body,status,fragment", COMPLETION_CASES.values(), ids=COMPLETION_CASES.keys())
def test_completion_error_then_good_request(micro_server, body, status, fragment):
    response = httpx.post(f"{micro_server.url}/v1/completions", json=body, timeout=30)
    assert_openai_error(response, status, fragment)
    assert_serves(micro_server)


@pytest.mark.parametrize("body,status,fragment", CHAT_CASES.values(), ids=CHAT_CASES.keys())
def test_chat_error_then_good_request(micro_server, body, status, fragment):
    response = httpx.post(f"{micro_server.url}/v1/chat/completions", json=body, timeout=30)
    assert_openai_error(response, status, fragment)
    assert_serves(micro_server)


def test_invalid_json_body_is_400(micro_server):
    response = httpx.post(f"{micro_server.url}/v1/completions", content=b'{"model": "micro", "prompt": ',
                          headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(response, 400, "not valid JSON")
    assert_serves(micro_server)


def test_body_not_an_object_is_400(micro_server):
    response = httpx.post(f"{micro_server.url}/v1/completions", json=["a", "list"], timeout=30)
    assert response.status_code == 400
    assert_serves(micro_server)


def test_unknown_route_in_openai_shape(micro_server):
    response = httpx.get(f"{micro_server.url}/v1/nothing", timeout=30)
    assert_openai_error(response, 404, "Not Found")


def test_stats_cursor_must_be_integer(micro_server):
    response = httpx.get(f"{micro_server.url}/v1/stats", params={"since_step": "last"}, timeout=30)
    assert_openai_error(response, 400, "since_step")


def test_openai_client_raises_typed_errors(micro_server):
    client = openai.OpenAI(base_url=f"{micro_server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="missing", prompt="x")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as overflow:
        client.completions.create(model=MICRO_NAME, prompt="abc", max_tokens=MAX_MODEL_LEN)
    assert "max_model_len" in overflow.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MICRO_NAME, messages=[{"role": "user", "content": "x"}],
                                       temperature=-2, stream=True)
    assert client.completions.create(model=MICRO_NAME, prompt="ok", max_tokens=2).choices[0].finish_reason in (
        "stop", "length")
