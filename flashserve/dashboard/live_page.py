"""Live page: a streaming chat with the served model beside the server's stats, refreshed every 1.5 s."""

from __future__ import annotations

import logging

import streamlit as st

from flashserve.dashboard import charts
from flashserve.dashboard.client import ServerClient, ServerUnavailable
from flashserve.dashboard.history import StatsHistory
from flashserve.dashboard.settings import serve_command

logger = logging.getLogger(__name__)

REFRESH_S = 1.5  # seconds between polls of /v1/stats
STATS_KEYS = (  # the /v1/stats fields the panels read
    "model", "num_running", "num_waiting", "num_preemptions", "kv_blocks_total", "kv_blocks_used",
    "kv_cache_usage_perc", "kv_fragmentation", "block_size", "block_owners", "steps", "recent_requests",
    "output_tokens_total", "uptime_s",
)
WINDOW_CHOICES_S = {"1 min": 60.0, "5 min": 300.0, "15 min": 900.0, "30 min": 1800.0}


def render() -> None:
    server_url = st.session_state["server_url"]
    client = ServerClient(server_url)

    with st.sidebar:
        st.toggle(f"Refresh every {REFRESH_S:g} s", value=True, key="live_refresh")
        window_label = st.selectbox("History shown", list(WINDOW_CHOICES_S), index=1, key="live_window")
    history = _history(server_url, WINDOW_CHOICES_S[window_label])

    st.title("Live server")
    chat_column, stats_column = st.columns([2, 3], gap="large")
    with chat_column:
        st.fragment(_chat_panel)(client)
    with stats_column:
        run_every = REFRESH_S if st.session_state["live_refresh"] else None
        st.fragment(run_every=run_every)(_stats_panel)(client, history)


def _history(server_url: str, window_s: float) -> StatsHistory:
    """Get the session's StatsHistory of `server_url`, or start a new one when the URL or the window changes."""
    history = st.session_state.get("live_history")
    if history is None or st.session_state.get("live_history_url") != server_url or history.window_s != window_s:
        history = StatsHistory(window_s=window_s)
        st.session_state["live_history"] = history
        st.session_state["live_history_url"] = server_url
    return history


# stats

def _stats_panel(client: ServerClient, history: StatsHistory) -> None:
    try:
        stats = client.stats(history.since_step)
    except ServerUnavailable as error:
        _set_server_up(False, client.base_url, str(error))
        _server_down(client.base_url, str(error))
        return
    try:
        missing = [key for key in STATS_KEYS if key not in stats]
        if missing:
            raise KeyError(f"missing fields {missing}")
        history.update(stats)
    except (KeyError, TypeError, ValueError) as error:
        _log_once("invalid_stats", f"invalid /v1/stats response from {client.base_url}: {error}")
        st.error(f"The server at {client.base_url} returned an invalid /v1/stats body ({error}). "
                 "Is it a Flash-Serve server of the same version as this dashboard?")
        return
    _set_server_up(True, client.base_url)

    _metrics(stats, history)
    _block_map(stats)
    _timeline_charts(history)
    _latency_histograms(history)


def _set_server_up(up: bool, server_url: str, reason: str = "") -> None:
    """Log a change of the server's state, and rerun the whole page when the server started or stopped
    since the chat was drawn, so that the chat enables or disables itself.

    In a full run the chat is drawn first, from its own check of the server. Only a change of
    this panel's own observation triggers the rerun, so a server whose /v1/models works but whose
    /v1/stats fails causes no rerun loop.
    """
    previous = st.session_state.get("stats_server_up")
    st.session_state["stats_server_up"] = up
    if previous != up:
        if up:
            logger.info("connected to the server at %s", server_url)
        else:
            logger.warning("the server at %s is unavailable: %s", server_url, reason)
    drawn_for = st.session_state.get("chat_drawn_for_up")
    if previous is not None and previous != up and drawn_for is not None and drawn_for != up:
        st.rerun()


def _log_once(kind: str, message: str) -> None:
    """Log `message` as a warning unless it repeats the last one of its kind in this session (a poll runs every 1.5 s)."""
    key = f"last_logged_{kind}"
    if st.session_state.get(key) != message:
        st.session_state[key] = message
        logger.warning("%s", message)


def _server_down(server_url: str, reason: str) -> None:
    st.error(f"No Flash-Serve server responds at {server_url}.")
    st.caption(reason)
    st.markdown("Start one, then this page connects by itself:")
    st.code(serve_command(server_url), language="bash")


def _metrics(stats: dict, history: StatsHistory) -> None:
    model = stats.get("model", "?")
    st.caption(f"Model **{model}** · up {_duration(float(stats['uptime_s']))} · "
               f"block size {stats['block_size']} tokens")

    rate = history.output_tokens_per_s()
    row = st.columns(4)
    row[0].metric("Running", stats["num_running"])
    row[1].metric("Waiting", stats["num_waiting"])
    row[2].metric("Output tokens/s", "–" if rate is None else f"{rate:.1f}")
    row[3].metric("Preemptions", stats["num_preemptions"])
    row = st.columns(4)
    row[0].metric("KV cache usage", f"{float(stats['kv_cache_usage_perc']):.1%}",
                  help=f"{stats['kv_blocks_used']} of {stats['kv_blocks_total']} blocks")
    row[1].metric("KV fragmentation", f"{float(stats['kv_fragmentation']):.1%}",
                  help="1 - tokens stored / token slots allocated")
    row[2].metric("Output tokens", stats["output_tokens_total"])
    row[3].metric("Recent requests", len(history.requests),
                  help=f"finished requests this page has seen, at most {history.max_requests}")


def _block_map(stats: dict) -> None:
    st.subheader("KV cache blocks")
    owners = stats["block_owners"]
    if not owners:
        st.info("The server reported no KV blocks.")
        return
    picture = charts.block_map(owners)
    num_used = len(owners) - owners.count(None)
    st.image(
        picture.image,
        caption=(f"{num_used} of {len(owners)} blocks used by {len(picture.blocks_per_owner)} requests "
                 f"({picture.num_columns} blocks per row, block 0 at the top left; white blocks are free)"),
    )
    if picture.blocks_per_owner:
        st.html(charts.legend_html(picture.blocks_per_owner))


def _timeline_charts(history: StatsHistory) -> None:
    timeline = history.timeline()
    if timeline.empty:
        st.info("No engine steps yet. Send a chat message or a request to the server to fill the charts.")
        return
    domain = history.time_domain(timeline)
    left, right = st.columns(2)
    left.altair_chart(charts.throughput_chart(timeline, domain), width="stretch")
    right.altair_chart(charts.queue_chart(timeline, domain), width="stretch")
    left, right = st.columns(2)
    left.altair_chart(charts.kv_chart(timeline, domain), width="stretch")
    right.altair_chart(charts.preemption_chart(timeline, domain), width="stretch")


def _latency_histograms(history: StatsHistory) -> None:
    left, right = st.columns(2)
    for column, histogram, title in (
        (left, history.ttft_histogram(), "Time to first token"),
        (right, history.itl_histogram(), "Inter-token latency"),
    ):
        with column:
            if histogram is None:
                st.caption(f"{title}: no finished requests yet.")
                continue
            st.altair_chart(charts.histogram_chart(histogram, title, "ms"), width="stretch")
            st.caption(f"{title}: {histogram.num_values} values, p50 {histogram.p50:.1f} ms, "
                       f"p99 {histogram.p99:.1f} ms")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


# chat

def _chat_panel(client: ServerClient) -> None:
    try:
        models = client.models()
    except ServerUnavailable:
        models = []
    model = models[0] if models else None
    up = model is not None
    st.session_state["chat_drawn_for_up"] = up
    messages: list[dict] = st.session_state.setdefault("chat_messages", [])

    st.subheader("Chat")
    box = st.container(height=460, border=True)
    with box:
        if not messages:
            st.caption(f"Messages go to {client.base_url}/v1/chat/completions and the reply streams back.")
        for message in messages:
            _draw_message(message)

    with st.expander("Generation settings"):
        max_tokens = st.number_input("Max tokens", min_value=1, max_value=8192, value=128, key="chat_max_tokens")
        temperature = st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="chat_temperature")
        if st.button("Clear chat", disabled=not messages):
            messages.clear()
            st.rerun(scope="fragment")

    placeholder = "Message the model" if up else "The server is down"
    prompt = st.chat_input(placeholder, disabled=not up, key="chat_prompt")
    if not prompt:
        return

    messages.append({"role": "user", "content": prompt})
    with box:
        _draw_message(messages[-1])
        with st.chat_message("assistant"):
            conversation = [m for m in messages if m["role"] in ("user", "assistant")]
            # NOTE: a session runs one script or fragment run at a time, so the stats panel pauses while a reply streams.
            try:
                reply = st.write_stream(client.stream_chat(model, conversation, int(max_tokens), float(temperature)))
            except ServerUnavailable as error:
                logger.warning("chat request to %s failed: %s", client.base_url, error)
                messages.append({"role": "error", "content": str(error)})
                st.error(str(error))
                return
    messages.append({"role": "assistant", "content": reply if isinstance(reply, str) else "".join(map(str, reply))})


def _draw_message(message: dict) -> None:
    if message["role"] == "error":
        st.error(message["content"])
        return
    with st.chat_message(message["role"]):
        if message["content"]:
            st.markdown(message["content"])
        else:
            st.caption("(empty reply)")
