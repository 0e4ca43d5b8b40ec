"""Pictures of the live page: the KV block map and the Altair charts of the stats timeline."""

from __future__ import annotations

import collections
import colorsys
import math
import zlib
from dataclasses import dataclass

import altair as alt
import numpy as np
import pandas as pd

from flashserve.dashboard.history import Histogram

FREE_BLOCK_RGB = (255, 255, 255)
GRID_LINE_RGB = (208, 212, 220)


def request_color(request_id: str) -> tuple[int, int, int]:
    """Hash `request_id` to a colour that stays the same across refreshes and dashboard sessions."""
    code = zlib.crc32(str(request_id).encode())
    hue = (code * 0.618033988749895) % 1.0  # golden-ratio steps spread neighbouring codes over the hue circle
    saturation = 0.55 + 0.3 * ((code >> 8) % 4) / 3
    value = 0.75 + 0.15 * ((code >> 12) % 3) / 2
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(red * 255), round(green * 255), round(blue * 255)


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@dataclass
class BlockMap:
    """An RGB picture of the KV cache: one cell per block, in block id order, row by row."""

    image: np.ndarray  # height x width x 3, uint8
    num_columns: int
    num_rows: int
    cell_px: int
    blocks_per_owner: dict[str, int]  # request id -> blocks it holds, most blocks first


def block_map(block_owners: list[str | None], max_width_px: int = 720) -> BlockMap:
    """Draw each block as a square coloured by the request that owns it. Free blocks stay white.

    Caches of up to 1024 blocks get 32 columns. Larger caches get a wider grid, so the picture
    stays about twice as wide as it is tall.
    """
    num_blocks = len(block_owners)
    if num_blocks == 0:
        raise ValueError("block_owners is empty; the server reported a KV cache without blocks")
    num_columns = 32 if num_blocks <= 1024 else math.ceil(math.sqrt(num_blocks * 2))
    num_rows = math.ceil(num_blocks / num_columns)
    cell_px = max(1, min(24, max_width_px // num_columns))
    gap_px = 1 if cell_px >= 4 else 0

    counts = collections.Counter(owner for owner in block_owners if owner is not None)
    palette = {owner: request_color(owner) for owner in counts}
    colors = np.full((num_rows * num_columns, 3), GRID_LINE_RGB, dtype=np.uint8)
    colors[:num_blocks] = FREE_BLOCK_RGB
    for index, owner in enumerate(block_owners):
        if owner is not None:
            colors[index] = palette[owner]
    grid = colors.reshape(num_rows, num_columns, 3)

    image = np.repeat(np.repeat(grid, cell_px, axis=0), cell_px, axis=1)
    if gap_px:
        image[cell_px - 1::cell_px, :, :] = GRID_LINE_RGB
        image[:, cell_px - 1::cell_px, :] = GRID_LINE_RGB
    return BlockMap(
        image=image,
        num_columns=num_columns,
        num_rows=num_rows,
        cell_px=cell_px,
        blocks_per_owner=dict(counts.most_common()),
    )


def legend_html(blocks_per_owner: dict[str, int], max_entries: int = 12) -> str:
    """HTML swatches naming the requests that hold the most blocks."""
    entries = []
    for owner, count in list(blocks_per_owner.items())[:max_entries]:
        swatch = (
            f'<span style="display:inline-block;width:0.9em;height:0.9em;border-radius:2px;'
            f'background:{hex_color(request_color(owner))};margin-right:0.3em;vertical-align:middle"></span>'
        )
        label = _escape(str(owner))
        entries.append(f'<span class="kv-owner" style="margin-right:1em;white-space:nowrap">{swatch}{label}: {count}</span>')
    hidden = len(blocks_per_owner) - max_entries
    if hidden > 0:
        entries.append(f"<span>and {hidden} more requests</span>")
    return '<div class="kv-legend" style="font-size:0.85em;line-height:1.8">' + "".join(entries) + "</div>"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# timeline charts

Domain = tuple[float, float]


def _time_axis(domain: Domain) -> alt.X:
    return alt.X("time_s:Q", title="server time (s)", scale=alt.Scale(domain=list(domain), nice=False))


def _show_points(timeline: pd.DataFrame) -> bool:
    """Mark each bin with a dot while there are few, so that a line of one or two bins is visible."""
    return len(timeline) <= 30


def throughput_chart(timeline: pd.DataFrame, domain: Domain) -> alt.Chart:
    return alt.Chart(timeline).mark_line(point=_show_points(timeline)).encode(
        _time_axis(domain),
        alt.Y("output_tokens_per_s:Q", title="output tokens/s"),
    ).properties(height=200, title="Output tokens per second")


def queue_chart(timeline: pd.DataFrame, domain: Domain) -> alt.Chart:
    long = timeline.melt(id_vars="time_s", value_vars=["num_running", "num_waiting"], var_name="queue",
                         value_name="requests")
    long["queue"] = long["queue"].map({"num_running": "running", "num_waiting": "waiting"})
    return alt.Chart(long).mark_line(interpolate="step-before", point=_show_points(timeline)).encode(
        _time_axis(domain),
        alt.Y("requests:Q", title="requests", axis=alt.Axis(tickMinStep=1, format="d")),
        alt.Color("queue:N", title=None),
    ).properties(height=200, title="Requests running and waiting")


def kv_chart(timeline: pd.DataFrame, domain: Domain) -> alt.Chart:
    long = timeline.melt(id_vars="time_s", value_vars=["kv_usage", "kv_fragmentation"], var_name="series",
                         value_name="fraction")
    long["series"] = long["series"].map({"kv_usage": "blocks used", "kv_fragmentation": "fragmentation"})
    return alt.Chart(long).mark_line(interpolate="step-before", point=_show_points(timeline)).encode(
        _time_axis(domain),
        alt.Y("fraction:Q", title=None, axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
        alt.Color("series:N", title=None),
    ).properties(height=200, title="KV cache usage and fragmentation")


def preemption_chart(timeline: pd.DataFrame, domain: Domain) -> alt.Chart:
    return alt.Chart(timeline).mark_bar().encode(
        _time_axis(domain),
        alt.Y("num_preempted:Q", title="preemptions", axis=alt.Axis(tickMinStep=1, format="d")),
    ).properties(height=200, title="Preemptions")


def histogram_chart(histogram: Histogram, title: str, unit: str) -> alt.Chart:
    return alt.Chart(histogram.to_frame()).mark_bar().encode(
        alt.X("start:Q", title=unit, bin="binned"),
        alt.X2("end:Q"),
        alt.Y("count:Q", title="count"),
    ).properties(height=200, title=title)


# results page

def latency_cdf_chart(cdf_frame: pd.DataFrame, metric: str, title: str) -> alt.Chart:
    """Plot the empirical CDF of one latency metric, one line per system."""
    frame = cdf_frame[cdf_frame["metric"] == metric]
    return alt.Chart(frame).mark_line(interpolate="step-after").encode(
        alt.X("seconds:Q", title="seconds"),
        alt.Y("fraction:Q", title="fraction of requests", axis=alt.Axis(format="%")),
        alt.Color("system:N"),
    ).properties(height=240, title=title)


def system_timeline_chart(timeline: pd.DataFrame, column: str, title: str, percent: bool = False) -> alt.Chart:
    """Plot one step-record quantity over time, one line per system."""
    axis = alt.Axis(format="%") if percent else alt.Axis()
    return alt.Chart(timeline).mark_line(interpolate="step-after").encode(
        alt.X("time_s:Q", title="time since the first arrival (s)"),
        alt.Y(f"{column}:Q", title=None, axis=axis),
        alt.Color("system:N"),
    ).properties(height=240, title=title)
