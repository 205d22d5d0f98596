"""`switchboard serve …`: every setting is a flag (and a SWITCHBOARD_<NAME> environment variable)."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from server.commands import ray_cli
from server.engine.errors import ModelLoadError
from server.serving.chat_template import load_template
from server.settings import Settings


def _add_flags(parser: argparse.ArgumentParser) -> None:
    for group_name, cls in Settings.groups().items():
        group = parser.add_argument_group(group_name)
        for name, field in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            help_text = f"{field.description or ''} (env SWITCHBOARD_{name.upper()}, default {field.default!r})"
            if field.annotation is bool:
                group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
                group.add_argument(flag, dest=name, default=None, choices=choices, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags override environment variables, which override defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    def build(cls: type[BaseSettings]) -> Any:
        return cls(**{k: v for k, v in given.items() if k in cls.model_fields})

    return Settings(**{name: build(cls) for name, cls in Settings.groups().items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchboard", description="Serve GPT-2 with routed LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server")
    _add_flags(serve)
    demo = sub.add_parser("demo", help="train starter adapters if the store has none, then serve with auto routing")
    demo.add_argument("--quick", action="store_true", help="a much smaller training budget (a smoke run)")
    _add_flags(demo)
    serve_ray = sub.add_parser("serve-ray", help="serve on Ray Serve: N replicas or autoscaling (needs the `ray` extra)")
    _add_flags(serve_ray)
    ray_cli.add_ray_flags(serve_ray)
    train = sub.add_parser("train", help="the offline training package (same as switchboard-train)", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "train":
        from training.cli import main as train_main

        return train_main(args.rest)
    command = args.command
    quick = bool(getattr(args, "quick", False))
    del args.command
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        parser.error(str(e))
    logging.basicConfig(level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # refuse a bad --chat-template before anything slow (loading the model, demo training, Ray)
        load_template(settings.server.chat_template)
    except ValueError as e:
        sys.stderr.write(f"switchboard: {e}\n")
        return 2
    if command == "serve-ray":
        return ray_cli.run(args, settings)
    from server.app import create_app
    from server.engine.base_model import load_base_model

    try:
        resident = load_base_model(settings.model.base_model, settings.model.device, settings.model.dtype,
                                   settings.model.quant)
    except ModelLoadError as e:
        sys.stderr.write(f"switchboard: {e}\n")  # one clear line for the operator, no traceback
        return 2
    if command == "demo":
        from server.commands.demo import run as run_demo

        return run_demo(settings, resident, quick)
    try:
        app = create_app(settings, resident=resident)
    except ValueError as e:  # e.g. a --chat-template that is neither a file nor a template
        sys.stderr.write(f"switchboard: {e}\n")
        return 2
    return run_server(app, settings)


def run_server(app: Any, settings: Settings) -> int:
    """Run uvicorn until SIGTERM or SIGINT, then shut down gracefully and return 0.

    On the signal uvicorn stops accepting connections and waits for the open ones (in-flight
    requests, streams included) for up to `shutdown_grace` seconds, cancelling what is left; then
    the app's lifespan drains the engine (`EngineWorker.drain`, the same bound). uvicorn then
    raises the signal again against the previous handler, which would end the process with -15
    after a clean drain: the handler installed here turns that into an exit with status 0.
    """
    import signal

    import uvicorn

    def exit_cleanly(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                            log_level=settings.server.log_level.lower(),
                            timeout_graceful_shutdown=max(1, round(settings.engine.shutdown_grace)))
    server = uvicorn.Server(config)
    signal.signal(signal.SIGTERM, exit_cleanly)
    signal.signal(signal.SIGINT, exit_cleanly)
    try:
        server.run()
    except SystemExit as e:
        return int(e.code or 0)
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
