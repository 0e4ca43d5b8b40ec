"""The HTTP load generator against a real server: complete records, failures kept as "error"
records, warm-up left out, concurrency cap honoured."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest
from server_fixtures import MICRO_NAME, MICRO_OPTIONS, micro_server  # noqa: F401

from experiments.http_client import completions_url, default_prompt_token_ids, replay_http_sync


@dataclass
class Spec:
    request_id: str
    arrival_time: float
    prompt_len: int
    output_len: int


def specs(count: int, spacing: float = 0.02, prompt_len: int = 6, output_len: int = 5) -> list[Spec]:
    return [Spec(f"r{i}", i * spacing, prompt_len + i, output_len + i % 3) for i in range(count)]


def test_replay_records_complete(micro_server):
    requests = specs(6)
    records = replay_http_sync(f"{micro_server.url}/v1", MICRO_NAME, requests, timeout_s=30)
    assert [r.request_id for r in records] == [r.request_id for r in requests]
    assert records.start_time == 0.0
    assert records.num_errors == 0
    for record, spec in zip(records, requests):
        assert record.finish_reason == "length", record.error
        assert record.error is None
        assert record.num_prompt_tokens == spec.prompt_len
        assert record.num_output_tokens == spec.output_len
        assert record.arrival_time >= spec.arrival_time - 1e-3
        assert record.arrival_time <= record.first_token_time <= record.finish_time <= records.end_time
        assert record.token_times[0] == record.first_token_time
        assert record.token_times == sorted(record.token_times)
        assert 1 <= len(record.token_times) <= spec.output_len
    assert records.end_time == max(r.finish_time for r in records)


def test_replay_keeps_failed_requests(micro_server):
    too_long = Spec("too-long", 0.0, MICRO_OPTIONS["max_model_len"] + 5, 4)
    requests = [*specs(2), too_long]
    records = replay_http_sync(micro_server.url, MICRO_NAME, requests, timeout_s=30)
    assert len(records) == 3
    assert records.num_errors == 1
    failed = records[2]
    assert failed.request_id == "too-long"
    assert failed.finish_reason == "error"
    assert "HTTP 400" in failed.error
    assert "max_model_len" in failed.error
    assert failed.num_output_tokens == 0
    assert failed.first_token_time is None
    assert all(r.finish_reason == "length" for r in records[:2])


def test_replay_leaves_out_warmup(micro_server):
    requests = specs(5)
    records = replay_http_sync(micro_server.url, MICRO_NAME, requests, warmup=2, timeout_s=30)
    assert [r.request_id for r in records] == ["r2", "r3", "r4"]
    # the measured window starts when the first measured request is due
    assert records[0].arrival_time < 0.02


def test_replay_concurrency_cap_serializes(micro_server):
    requests = [Spec(f"c{i}", 0.0, 4, 6) for i in range(3)]
    records = replay_http_sync(micro_server.url, MICRO_NAME, requests, timeout_s=30, max_concurrency=1)
    ordered = sorted(records, key=lambda r: r.arrival_time)
    for previous, current in zip(ordered, ordered[1:]):
        assert current.arrival_time >= previous.finish_time - 1e-3


def test_replay_against_closed_port_returns_errors():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once the socket closes
    records = replay_http_sync(f"http://127.0.0.1:{port}", MICRO_NAME, specs(3), timeout_s=5)
    assert len(records) == 3
    assert records.num_errors == 3
    assert all(r.error and "Connect" in r.error for r in records)


def test_replay_rejects_bad_warmup():
    with pytest.raises(ValueError, match="warmup"):
        replay_http_sync("http://127.0.0.1:1", MICRO_NAME, specs(2), warmup=3, timeout_s=1)


def test_prompt_ids_deterministic_and_in_range():
    spec = Spec("same", 0.0, 50, 1)
    ids = default_prompt_token_ids(spec, seed=3)
    assert ids == default_prompt_token_ids(spec, seed=3)
    assert ids != default_prompt_token_ids(spec, seed=4)
    assert len(ids) == 50 and all(3 <= i <= 200 for i in ids)


@pytest.mark.parametrize("base", ["http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"])
def test_completions_url_with_or_without_v1(base):
    assert completions_url(base) == "http://h:1/v1/completions"
