"""The ``bagel`` command. Each sub-command lives in its own module and registers itself on ``app``."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="bagel",
    help="Run and fine-tune ByteDance's BAGEL-7B-MoT: text to image, image editing, image understanding and chat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from bagel_engine import __version__

        typer.echo(f"bagel-engine {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (loading, timings)."),
) -> None:
    """Run and fine-tune ByteDance's BAGEL-7B-MoT: text to image, image editing, image understanding and chat."""
    import logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    # Importing a command module registers its commands on ``app``.
    import importlib

    for name in ("inspect_cmd", "jobs", "batch_cmd", "serve_cmd", "bench_cmd", "train_cmd", "eval_cmd", "shapes_cmd"):
        importlib.import_module(f"bagel_engine.cli.{name}")


def main() -> None:
    _register()
    app()


if __name__ == "__main__":
    # Run through the package module so that command modules register on the same ``app``.
    from bagel_engine.cli.main import main as _main

    _main()
