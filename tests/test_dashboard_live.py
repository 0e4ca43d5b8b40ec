"""The dashboard's live page: settings, stats history, block map, client, and the page under AppTest."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from dashboard_fake_server import EchoEngine, ServerThread, create_app, free_port
from server_fixtures import MICRO_NAME, micro_server  # noqa: F401
from streamlit.testing.v1 import AppTest

from flashserve.dashboard import charts
from flashserve.dashboard.client import ServerClient, ServerUnavailable, _content_deltas
from flashserve.dashboard.history import StatsHistory
from flashserve.dashboard.settings import normalize_server_url, parse_settings, serve_command

APP = Path(__file__).resolve().parents[1] / "flashserve" / "dashboard" / "app.py"
PAGE_TIMEOUT_S = 60  # the first run of a test process imports torch through the flashserve package


def make_app(monkeypatch, server_url: str, results_dir: Path) -> AppTest:
    monkeypatch.setenv("FLASHSERVE_SERVER_URL", server_url)
    monkeypatch.setenv("FLASHSERVE_RESULTS_DIR", str(results_dir))
    return AppTest.from_file(str(APP), default_timeout=PAGE_TIMEOUT_S)


def metrics_of(at: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in at.metric}


@pytest.fixture(scope="module")
def echo_server():
    """The fake server: the real scheduler with a word-echo model, 64 blocks of 4 tokens, a step every 20 ms."""
    with ServerThread(create_app(EchoEngine(num_kv_blocks=64, block_size=4, step_s=0.02))) as server:
        yield server


def post_in_background(url: str, content: str, max_tokens: int) -> threading.Thread:
    """A bounded chat request that keeps generating until max_tokens (ignore_eos), in a thread."""
    thread = threading.Thread(target=httpx.post, args=(url + "/v1/chat/completions",), kwargs={
        "json": {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "ignore_eos": True},
        "timeout": 30,
    }, daemon=True)
    thread.start()
    return thread


def wait_for_stats(url: str, condition, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = httpx.get(url + "/v1/stats", timeout=5).json()
        if condition(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the stats did not reach the expected state within {timeout_s} s: {stats}")
        time.sleep(0.02)


# settings

def test_settings_argv_over_environment():
    environ = {"FLASHSERVE_SERVER_URL": "http://10.0.0.1:9000", "FLASHSERVE_RESULTS_DIR": "/data/results"}
    settings = parse_settings(["--server", "127.0.0.1:8100/v1/", "--results", "runs"], environ)
    assert settings.server_url == "http://127.0.0.1:8100"
    assert settings.results_dir == "runs"


def test_settings_environment_then_defaults():
    environ = {"FLASHSERVE_SERVER_URL": "http://127.0.0.1:9000", "FLASHSERVE_RESULTS_DIR": "/data/results"}
    assert parse_settings(["-q", "tests/test_x.py"], environ).server_url == "http://127.0.0.1:9000"
    assert parse_settings([], environ).results_dir == "/data/results"
    defaults = parse_settings([], {})
    assert defaults.server_url == "http://127.0.0.1:8000"
    assert defaults.results_dir == "results"


def test_serve_command_names_port_and_host():
    assert serve_command("http://127.0.0.1:8000") == "flashserve serve --model tiny-llama"
    assert serve_command("http://localhost:8123") == "flashserve serve --model tiny-llama --port 8123"
    assert serve_command("http://gpu-box:9000") == "flashserve serve --model tiny-llama --host gpu-box --port 9000"
    assert normalize_server_url(" http://h:1/ ") == "http://h:1"


# block map

def test_block_map_colours_owned_blocks():
    owners = ["a", "a", None, "b", None, "a"] + [None] * 30
    picture = charts.block_map(owners, max_width_px=320)
    cell = picture.cell_px
    assert picture.num_columns == 32
    assert picture.num_rows == 2
    assert picture.image.shape == (2 * cell, 32 * cell, 3)
    assert picture.blocks_per_owner == {"a": 3, "b": 1}

    def color(index: int) -> tuple[int, ...]:
        row, column = divmod(index, 32)
        return tuple(int(v) for v in picture.image[row * cell + cell // 2, column * cell + cell // 2])

    assert color(0) == charts.request_color("a")
    assert color(5) == charts.request_color("a")
    assert color(3) == charts.request_color("b")
    assert color(2) == charts.FREE_BLOCK_RGB
    assert color(35) == charts.FREE_BLOCK_RGB
    assert color(40) == charts.GRID_LINE_RGB  # past the last block: padding of the last row
    assert charts.request_color("a") != charts.request_color("b")


def test_block_map_large_cache_stays_wide():
    picture = charts.block_map([None] * 20_000 + ["x"], max_width_px=720)
    assert picture.num_columns == 201
    assert picture.num_rows == 100
    assert picture.image.shape[1] <= 720
    assert np.all(picture.image[-1, -1] == charts.GRID_LINE_RGB)


def test_block_map_rejects_empty_cache():
    with pytest.raises(ValueError, match="without blocks"):
        charts.block_map([])


def test_legend_escapes_and_limits_entries():
    legend = charts.legend_html({f"<r{i}>": 20 - i for i in range(14)}, max_entries=12)
    assert legend.count('class="kv-owner"') == 12
    assert "&lt;r0&gt;: 20" in legend
    assert "<r0>" not in legend
    assert "and 2 more requests" in legend


# stats history

def step(number: int, start: float, **fields) -> dict:
    record = {
        "step": number, "start_time": start, "duration": 0.1, "num_prefill_tokens": 0, "num_decode_seqs": 1,
        "num_prefill_seqs": 0, "num_context_tokens": 10, "sum_sq_prefill_tokens": 0, "num_sampled": 1,
        "num_running": 1, "num_waiting": 0, "num_preempted": 0, "kv_blocks_used": 2, "kv_blocks_total": 8,
        "kv_tokens_used": 24, "kv_slots_allocated": 32, "kv_slots_reserved": 0,
    }
    record.update(fields)
    return record


def stats_with(steps: list[dict], uptime_s: float, output_tokens_total: int, requests=(), next_step=None) -> dict:
    return {
        "model": "m", "num_running": 1, "num_waiting": 0, "num_preemptions": 0, "kv_blocks_total": 8,
        "kv_blocks_used": 2, "kv_cache_usage_perc": 0.25, "kv_fragmentation": 0.25, "block_size": 16,
        "block_owners": ["r", "r"] + [None] * 6, "steps": steps,
        "next_step": steps[-1]["step"] if steps and next_step is None else (next_step or 0),
        "recent_requests": list(requests), "output_tokens_total": output_tokens_total, "uptime_s": uptime_s,
    }


def test_history_bins_throughput_and_cache_state():
    history = StatsHistory(window_s=300)
    # 10 steps in second 0 sampling 2 tokens each, 5 in second 1 sampling 1, one preemption in second 1
    steps = [step(i, 0.05 + 0.09 * i, duration=0.01, num_sampled=2) for i in range(10)]
    steps += [step(10 + i, 1.1 + 0.15 * i, duration=0.01, kv_blocks_used=4, kv_tokens_used=48,
                   kv_slots_allocated=64, num_preempted=int(i == 2), num_waiting=1) for i in range(5)]
    steps += [step(15, 2.5, duration=0.01, num_sampled=0)]
    history.update(stats_with(steps, uptime_s=2.6, output_tokens_total=25))
    assert history.since_step == 15

    timeline = history.timeline()
    assert list(timeline["time_s"]) == [1.0, 2.0, 3.0]
    assert timeline["output_tokens_per_s"].iloc[0] == 20.0
    assert timeline["output_tokens_per_s"].iloc[1] == 5.0
    assert np.isnan(timeline["output_tokens_per_s"].iloc[2])  # the open bin
    assert timeline["kv_usage"].iloc[0] == 0.25
    assert timeline["kv_usage"].iloc[1] == 0.5
    assert timeline["kv_fragmentation"].iloc[1] == 0.25
    assert timeline["num_waiting"].iloc[1] == 1
    assert timeline["num_preempted"].tolist() == [0, 1, 0]


def test_history_fills_idle_bins_with_last_state():
    history = StatsHistory()
    history.update(stats_with([step(0, 0.2, kv_blocks_used=6), step(1, 3.4, kv_blocks_used=6)],
                              uptime_s=3.6, output_tokens_total=2))
    timeline = history.timeline()
    assert list(timeline["time_s"]) == [1.0, 2.0, 3.0, 4.0]
    assert timeline["output_tokens_per_s"].tolist()[:3] == [1.0, 0.0, 0.0]
    assert timeline["kv_usage"].tolist() == [0.75] * 4


def test_history_time_domain():
    history = StatsHistory()
    history.update(stats_with([step(0, 2.0), step(1, 3.0)], uptime_s=3.1, output_tokens_total=2))
    assert history.time_domain(history.timeline()) == (0.0, 4.0)

    history = StatsHistory()
    history.update(stats_with([step(i, 100.0 + i) for i in range(60)], uptime_s=160.5, output_tokens_total=60))
    start, end = history.time_domain(history.timeline())
    assert start == 101.0  # the end of the first 1 s bin
    assert end == 160.0  # the end of the open bin that contains the last step (which ends at 159.1 s)


def test_history_cursor_dedup_and_window():
    history = StatsHistory(window_s=10, max_requests=2)
    requests = [{"request_id": "a", "ttft": 0.1, "itl": [0.01, 0.02]}, {"request_id": "b", "ttft": 0.3, "itl": []}]
    history.update(stats_with([step(0, 0.0), step(1, 1.0)], uptime_s=1.2, output_tokens_total=2, requests=requests))
    # the same steps again (a server sends everything it keeps after a cursor it does not know) are skipped
    history.update(stats_with([step(0, 0.0), step(1, 1.0), step(2, 20.0)], uptime_s=20.2, output_tokens_total=3,
                              requests=requests + [{"request_id": "c", "ttft": 0.2, "itl": [0.03]}]))
    assert history.steps["step"].tolist() == [2]  # steps older than the 10 s window are dropped
    assert list(history.requests) == ["b", "c"]
    assert history.ttft_histogram().num_values == 2
    assert history.itl_histogram().num_values == 1
    assert history.itl_histogram().p50 == pytest.approx(30.0)


def test_history_resets_after_server_restart():
    history = StatsHistory()
    history.update(stats_with([step(i, 0.1 * i) for i in range(50)], uptime_s=5.0, output_tokens_total=50))
    history.update(stats_with([step(0, 0.1)], uptime_s=0.5, output_tokens_total=1))
    assert history.num_resets == 1
    assert history.steps["step"].tolist() == [0]
    assert history.since_step == 0


def test_history_output_rate_from_counters():
    history = StatsHistory()
    assert history.output_tokens_per_s() is None
    for second in range(8):
        history.update(stats_with([], uptime_s=float(second), output_tokens_total=100 * second, next_step=-1))
    assert history.output_tokens_per_s(over_s=5.0) == pytest.approx(100.0)


def test_histogram_percentiles_in_ms():
    history = StatsHistory()
    requests = [{"request_id": str(i), "ttft": i / 1000, "itl": [0.005] * 3} for i in range(1, 101)]
    history.update(stats_with([], uptime_s=1.0, output_tokens_total=0, requests=requests, next_step=-1))
    ttft = history.ttft_histogram(num_bins=10)
    assert ttft.num_values == 100
    assert ttft.p50 == pytest.approx(50.5)
    assert ttft.counts.sum() == 100
    assert ttft.edges[0] == pytest.approx(1.0)
    assert ttft.edges[-1] == pytest.approx(100.0)
    itl = history.itl_histogram()
    assert itl.num_values == 300
    assert itl.p99 == pytest.approx(5.0)


# client

def test_client_streams_chat_reply(echo_server):
    client = ServerClient(echo_server.url)
    client.health()
    pieces = list(client.stream_chat("fake-echo", [{"role": "user", "content": "one two three"}], 32, 0.0))
    assert "".join(pieces) == "You said: one two three"
    assert len(pieces) == 5


def test_client_reports_refused_connection():
    client = ServerClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServerUnavailable, match="GET .*/health failed"):
        client.health()
    with pytest.raises(ServerUnavailable, match="POST .*/v1/chat/completions failed"):
        list(client.stream_chat("m", [{"role": "user", "content": "x"}], 4, 0.0))


def test_client_reports_error_status(echo_server):
    client = ServerClient(echo_server.url)
    with pytest.raises(ServerUnavailable, match="HTTP 400"):
        list(client.stream_chat("fake-echo", [{"role": "user", "content": "x"}], 100_000, 0.0))


def test_stream_parser_rejects_invalid_chunk():
    lines = iter(['data: {"choices": [{"delta": {"content": "ok"}}]}', "", "data: {not json"])
    deltas = _content_deltas(lines)
    assert next(deltas) == "ok"
    with pytest.raises(ServerUnavailable, match="invalid stream chunk"):
        next(deltas)
    error_lines = iter(['data: {"error": {"message": "engine failed"}}'])
    with pytest.raises(ServerUnavailable, match="engine failed"):
        list(_content_deltas(error_lines))


# the page under AppTest

def test_page_when_server_is_down(monkeypatch, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    at = make_app(monkeypatch, url, tmp_path).run()
    assert not at.exception
    assert any(f"No Flash-Serve server responds at {url}" in error.value for error in at.error)
    assert [code.value for code in at.code] == [f"flashserve serve --model tiny-llama --port {url.rsplit(':', 1)[1]}"]
    assert at.chat_input[0].disabled
    assert not at.metric


def test_page_connects_when_server_starts(monkeypatch, tmp_path):
    port = free_port()
    at = make_app(monkeypatch, f"http://127.0.0.1:{port}", tmp_path).run()
    assert at.error
    with ServerThread(create_app(EchoEngine(num_kv_blocks=16, block_size=4)), port=port):
        at.run()
        assert not at.exception
        assert not at.error
        assert metrics_of(at)["Running"] == "0"
        assert not at.chat_input[0].disabled


def test_page_shows_requests_holding_blocks(monkeypatch, tmp_path, echo_server):
    # two requests of 150 tokens at 20 ms a step run for about 3 s
    threads = [post_in_background(echo_server.url, f"hold blocks {i}", 150) for i in range(2)]
    wait_for_stats(echo_server.url, lambda s: s["num_running"] == 2 and s["kv_blocks_used"] >= 4)

    at = make_app(monkeypatch, echo_server.url, tmp_path).run()
    assert not at.exception
    displayed = metrics_of(at)
    assert displayed["Running"] == "2"
    assert displayed["Waiting"] == "0"
    assert displayed["Preemptions"] == "0"
    assert displayed["KV cache usage"].endswith("%")
    assert float(displayed["KV cache usage"].rstrip("%")) > 0

    assert len(at.image) == 1
    assert "of 64 blocks used by 2 requests" in at.image[0].captions[0]
    assert at.html[0].value.count('class="kv-owner"') == 2
    assert any("Model **fake-echo**" in caption.value for caption in at.caption)
    for thread in threads:
        thread.join(timeout=20)


def test_page_chat_streams_reply(monkeypatch, tmp_path, echo_server):
    at = make_app(monkeypatch, echo_server.url, tmp_path).run()
    at.chat_input[0].set_value("hello dashboard").run()
    assert not at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert at.chat_message[1].markdown[0].value == "You said: hello dashboard"

    at.chat_input[0].set_value("and again").run()
    assert [m.markdown[0].value for m in at.chat_message] == [
        "hello dashboard", "You said: hello dashboard", "and again", "You said: and again",
    ]

    # the finished requests reach the latency histograms at the next refresh
    at.run()
    captions = [caption.value for caption in at.caption]
    assert any(c.startswith("Time to first token: ") and "values, p50" in c for c in captions)
    assert any(c.startswith("Inter-token latency: ") and "values, p50" in c for c in captions)


def test_page_against_real_server(monkeypatch, tmp_path, micro_server):  # noqa: F811
    """The real flashserve server: stats panels match /v1/stats and the chat shows the server's greedy reply."""
    expected = openai.OpenAI(base_url=micro_server.url + "/v1", api_key="unused").chat.completions.create(
        model=MICRO_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0.0,
    ).choices[0].message.content
    micro_server.wait_idle()

    at = make_app(monkeypatch, micro_server.url, tmp_path).run()
    assert not at.exception
    stats = micro_server.stats()
    displayed = metrics_of(at)
    assert displayed["Running"] == "0"
    assert displayed["Output tokens"] == str(stats["output_tokens_total"])
    assert at.image[0].captions[0].startswith(f"0 of {stats['kv_blocks_total']} blocks used by 0 requests")

    at.number_input(key="chat_max_tokens").set_value(8)
    at.slider(key="chat_temperature").set_value(0.0)
    at.chat_input[0].set_value("Hi").run()
    assert not at.exception
    assert not at.error
    reply = at.chat_message[1]
    assert reply.name == "assistant"
    assert reply.markdown[0].value == expected

    at.run()  # the next refresh counts the chat request's tokens
    assert int(metrics_of(at)["Output tokens"]) > stats["output_tokens_total"]

