"""The `servelet` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from .settings import SettingsError, load_gateway_settings, load_instance_settings

app = typer.Typer(help="servelet: model serving on one machine.", no_args_is_help=True, add_completion=False)


def _start_instance(**overrides) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_instance_settings(**overrides)
    except SettingsError as exc:
        typer.echo(f"servelet: {exc}", err=True)
        raise typer.Exit(2) from None
    from .instance.server import run_instance  # imports llama.cpp: only once settings are sound

    raise typer.Exit(run_instance(settings))


@app.command()
def container(
    model: Annotated[Optional[str], typer.Option(help="Model URI (default: $HF_MODEL_ID / $OPTION_MODEL_ID or the default model).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1; 0.0.0.0 inside a container image).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default $SAGEMAKER_BIND_TO_PORT or 8080).")] = None,
    socket: Annotated[Optional[Path], typer.Option(help="Listen on this Unix socket instead of a port.")] = None,
):
    """Run one instance: the SageMaker hosting contract (GET /ping, POST /invocations) over one model."""
    _start_instance(model=model, host=host, port=port, socket=socket)


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help="Model URI of the endpoint `default` (default: the Gemma 3 270M package).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on (default 8080).")] = None,
    instances: Annotated[Optional[int], typer.Option(help="Instances of the endpoint `default`; 0 deploys none.")] = None,
):
    """Run the gateway (every API family on one port) with the endpoint `default` deployed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_gateway_settings(model=model, host=host, port=port, instances=instances)
    except SettingsError as exc:
        typer.echo(f"servelet: {exc}", err=True)
        raise typer.Exit(2) from None
    from .gateway.server import run_gateway

    raise typer.Exit(run_gateway(settings))


if __name__ == "__main__":
    app()
