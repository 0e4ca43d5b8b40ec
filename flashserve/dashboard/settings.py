"""Dashboard settings: the server URL and the results folder, from the command line or the environment."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
DEFAULT_RESULTS_DIR = "results"
SERVER_URL_ENV = "FLASHSERVE_SERVER_URL"
RESULTS_DIR_ENV = "FLASHSERVE_RESULTS_DIR"

SERVE_COMMAND = "flashserve serve --model tiny-llama"
RUN_COMMAND = "python -m experiments run +workload=poisson"


@dataclass(frozen=True)
class DashboardSettings:
    server_url: str  # base URL of a Flash-Serve server, without the /v1 suffix
    results_dir: str  # folder of experiment runs: <date>/<time>-<workload>/


def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> DashboardSettings:
    """Read `--server` and `--results` from `argv`; missing options fall back to the environment, then the defaults.

    `streamlit run app.py -- --server URL` passes the arguments after `--` as `sys.argv[1:]`.
    Unknown arguments are ignored, because under a test runner `sys.argv` is the runner's.
    """
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="flashserve dashboard", add_help=False, allow_abbrev=False)
    parser.add_argument("--server", default=environ.get(SERVER_URL_ENV) or DEFAULT_SERVER_URL)
    parser.add_argument("--results", default=environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR)
    args, _ = parser.parse_known_args(argv)
    return DashboardSettings(server_url=normalize_server_url(args.server), results_dir=args.results)


def normalize_server_url(url: str) -> str:
    """Strip whitespace, a trailing slash and a trailing /v1, and add http:// when no scheme is given."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if "://" not in url:
        url = "http://" + url
    return url


def serve_command(server_url: str) -> str:
    """Build the command that starts a server which the dashboard can reach at `server_url`."""
    parts = urlsplit(server_url)
    command = SERVE_COMMAND
    if parts.hostname not in (None, "127.0.0.1", "localhost"):
        command += f" --host {parts.hostname}"
    if parts.port not in (None, 8000):
        command += f" --port {parts.port}"
    return command
