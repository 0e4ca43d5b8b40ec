"""The dashboard in a real browser: `streamlit run` as a subprocess, headless Chromium through Playwright."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from dashboard_fake_server import EchoEngine, ServerThread, create_app, free_port
from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
APP = Path(__file__).resolve().parents[1] / "flashserve" / "dashboard" / "app.py"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"Chromium is missing at {CHROMIUM}; install Debian's chromium package (apt-get install chromium)",
)


@pytest.fixture
def dashboard(tmp_path):
    """A fake server and the dashboard pointed at it, as (dashboard URL, server URL)."""
    engine = EchoEngine(num_kv_blocks=128, block_size=4, step_s=0.1)
    with ServerThread(create_app(engine)) as server:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--", "--server", server.url, "--results", str(tmp_path / "results")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url + "/_stcore/health", process)
            yield url, server.url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _start_background_requests(server_url: str, count: int = 2) -> list[threading.Thread]:
    """Requests that hold KV blocks for about 15 s: 150 tokens at 0.1 s a step, then they stop by themselves."""
    threads = [
        threading.Thread(target=httpx.post, args=(server_url + "/v1/chat/completions",), kwargs={
            "json": {"messages": [{"role": "user", "content": f"background {i}"}], "max_tokens": 150,
                     "ignore_eos": True},
            "timeout": 30,
        }, daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"streamlit did not answer at {url} within {timeout_s} s")


def test_live_page_chat_and_block_map(dashboard, tmp_path):
    dashboard_url, server_url = dashboard
    screenshot = tmp_path / "dashboard-live.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.goto(dashboard_url)
            # The first run imports torch through the flashserve package, which takes a while on a busy machine.
            expect(page.get_by_role("heading", name="Live server")).to_be_visible(timeout=90_000)
            expect(page.get_by_text("of 128 blocks used")).to_be_visible(timeout=20_000)
            background = _start_background_requests(server_url)

            # the block map shows the blocks of the background requests and names them in its legend
            expect(page.locator(".kv-owner")).to_have_count(2, timeout=10_000)
            expect(page.get_by_test_id("stImage").locator("img").first).to_be_visible()

            prompt = page.get_by_test_id("stChatInputTextArea")
            expect(prompt).to_be_enabled(timeout=10_000)
            prompt.fill("hello from chromium")
            prompt.press("Enter")

            reply = page.get_by_test_id("stChatMessage").filter(has_text="You said: hello from chromium")
            expect(reply).to_be_visible(timeout=20_000)
            chart = page.get_by_test_id("stVegaLiteChart").filter(has_text="Output tokens per second")
            expect(chart).to_be_visible(timeout=10_000)
            # a later refresh lists the finished chat request in the latency histograms
            expect(page.get_by_text(re.compile(r"^Time to first token: \d+ values"))).to_be_visible(timeout=10_000)

            # pause the refresh, so that the screenshot catches no chart while it is redrawn
            page.get_by_text("Refresh every 1.5 s").click()
            expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=10_000)
            page.wait_for_timeout(1_000)
            expect(page.get_by_test_id("stChatMessage").filter(has_text="You said: hello from chromium")).to_be_visible()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    for thread in background:
        thread.join(timeout=15)
    assert screenshot.stat().st_size > 10_000
