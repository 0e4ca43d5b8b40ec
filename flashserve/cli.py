"""The `flashserve` command: `serve` runs the OpenAI-compatible server, `dashboard` the Streamlit app."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from flashserve.config import EngineConfig
from flashserve.core.scheduler import BATCHING_POLICIES, KV_ALLOCATIONS

logger = logging.getLogger(__name__)

# engine options of `serve`: flag -> (EngineConfig field, type, help)
ENGINE_OPTIONS = {
    "--block-size": ("block_size", int, "token slots per KV block (default 16)"),
    "--num-kv-blocks": ("num_kv_blocks", int, "KV cache blocks (default: sized from the memory settings)"),
    "--max-num-seqs": ("max_num_seqs", int, "maximum requests running in one step (default 64)"),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int, "token budget of one step (default 2048)"),
    "--max-model-len": ("max_model_len", int, "maximum prompt + output tokens (default: the model's limit)"),
    "--device": ("device", str, "'auto', 'cpu', 'cuda' or 'cuda:N' (default auto)"),
    "--dtype": ("dtype", str, "'auto', 'float32', 'bfloat16' or 'float16' (default auto)"),
    "--seed": ("seed", int, "seed of dummy weights and of unseeded requests (default 0)"),
    "--load-format": ("load_format", str, "'auto' (checkpoint weights) or 'dummy' (seeded random weights)"),
    "--kv-cache-memory-gb": ("kv_cache_memory_gb", float, "CPU: GiB of KV cache when --num-kv-blocks is unset"),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float, "CUDA: fraction of GPU memory to use"),
}


def tcp_port(text: str) -> int:
    """Parse a TCP port number, rejecting values outside 1-65535 before the model loads."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}; use an integer in 1-65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /v1/stats, /health and /metrics. "
                    "Chat messages are rendered with the tokenizer's chat template; a tokenizer without one gets a "
                    "plain template: a 'role: content' line per message, then 'assistant:'.",
    )
    serve.add_argument("--model", default="tiny-llama",
                       help="checkpoint directory, model config file, or a name in conf/model (default tiny-llama)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=tcp_port, default=8000, help="TCP port, 1-65535 (default 8000)")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="model names that requests may use (default: the --model value)")
    serve.add_argument("--batching", choices=BATCHING_POLICIES, default=None,
                       help="'continuous' or 'static' batching (default continuous)")
    serve.add_argument("--kv-allocation", choices=KV_ALLOCATIONS, default=None,
                       help="'paged' (blocks on demand) or 'contiguous' (reserve prompt + max_tokens)")
    for flag, (_, kind, help_text) in ENGINE_OPTIONS.items():
        serve.add_argument(flag, type=kind, default=None, help=help_text)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    dashboard = commands.add_parser("dashboard", help="run the Streamlit dashboard")
    dashboard.add_argument("--server", default="http://127.0.0.1:8000", help="URL of a running flashserve server")
    dashboard.add_argument("--results", default="results/", help="folder of experiment results to show")
    dashboard.add_argument("--port", type=tcp_port, default=8501, help="port of the dashboard, 1-65535 (default 8501)")
    dashboard.add_argument("--host", default="127.0.0.1", help="address the dashboard listens on (default 127.0.0.1)")
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the `serve` flags; unset flags keep EngineConfig's defaults."""
    options = {"model": args.model}
    for field_name in [field for field, _, _ in ENGINE_OPTIONS.values()] + ["batching", "kv_allocation"]:
        value = getattr(args, field_name)
        if value is not None:
            options[field_name] = value
    return EngineConfig(**options)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from flashserve.engine import LLMEngine
    from flashserve.server.api import build_app

    try:
        engine = LLMEngine(engine_config(args))
    except ValueError as error:
        logger.error("cannot start the engine: %s", error)
        return 2
    app = build_app(engine, args.served_model_name or [args.model])
    logger.info("listening on http://%s:%d", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def dashboard_command(args: argparse.Namespace) -> list[str]:
    """Build the `streamlit run` command line of the dashboard app shipped in flashserve/dashboard."""
    import flashserve.dashboard

    app = Path(flashserve.dashboard.__file__).parent / "app.py"
    return [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.port", str(args.port), "--server.address", args.host, "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--", "--server", args.server, "--results", args.results,
    ]


def dashboard(args: argparse.Namespace) -> int:
    command = dashboard_command(args)
    app = Path(command[4])
    if not app.is_file():
        logger.error("dashboard app %s not found; reinstall flashserve", app)
        return 2
    logger.info("starting the dashboard on port %d: %s", args.port, " ".join(command))
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve(args)
    return dashboard(args)


if __name__ == "__main__":
    sys.exit(main())
