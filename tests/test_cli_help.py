"""The help teaches what is true: per-command defaults, text rich would swallow, and options every
front end promises (``bagel ui --share``)."""

from __future__ import annotations

import re

import typer
from typer.testing import CliRunner

from bagel_engine.cli import main as cli_main

cli_main._register()
COMMANDS = {c.name or c.callback.__name__: c for c in cli_main.app.registered_commands}
RUNNER = CliRunner()


def help_text(*args: str) -> str:
    r = RUNNER.invoke(cli_main.app, [*args, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert r.exit_code == 0, r.output
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", r.output))


def test_no_help_text_holds_a_tag_rich_would_swallow():
    click_app = typer.main.get_command(cli_main.app)
    tag = re.compile(r"(?<!\\)\[[A-Za-z_][\w/.-]*\]")  # [quant] is markup to rich: escape it as \[quant]
    found = []
    for name, command in click_app.commands.items():
        for param in command.params:
            for match in tag.finditer(getattr(param, "help", None) or ""):
                found.append(f"bagel {name} {param.opts[0]}: {match.group()}")
    assert not found, found
    assert "pip install bagel-engine[quant]" in help_text("generate")


def test_edit_and_generate_show_their_own_defaults():
    edit, generate = help_text("edit"), help_text("generate")
    assert "the input image (official 1-2). [default: 2.0]" in edit
    assert "[LO, HI]. [default: 0.0 1.0]" in edit and "renormalized. [default: text_channel]" in edit
    assert "the input image (official 1-2). [default: 1.5]" in generate
    assert "[LO, HI]. [default: 0.4 1.0]" in generate and "renormalized. [default: global]" in generate
    assert "bagel-shapes: of 8 up to 128" in generate  # the size limits are the model's


def test_ui_can_share_and_warns_without_a_key(monkeypatch):
    import bagel_engine.cli.serve_cmd as serve_cmd
    import bagel_engine.serve as serve
    import bagel_engine.ui as ui

    seen = {}

    class Worker:
        def __init__(self, pipe, **kw):
            pass

        def start(self):
            return self

        def stop(self, timeout):
            seen["stopped"] = True

    monkeypatch.setattr(serve_cmd, "_load", lambda model, *a, **kw: seen.update(model=model) or object())
    monkeypatch.setattr(serve, "ModelWorker", Worker)
    monkeypatch.setattr(ui, "launch_ui", lambda worker, pipe, settings, **kw: seen.update(kw))
    assert "--share" in help_text("ui")
    r = RUNNER.invoke(cli_main.app, ["ui", "--model", "x", "--share"])
    assert r.exit_code == 0, r.output
    assert seen["share"] is True and seen["stopped"]
    assert "--share without --api-key" in r.stderr
    r = RUNNER.invoke(cli_main.app, ["ui", "--model", "x", "--share", "--api-key", "k"])
    assert "--share without" not in r.stderr
    r = RUNNER.invoke(cli_main.app, ["ui"], env={"BAGEL_MODEL": "from-env"})  # the variable names the model
    assert r.exit_code == 0 and seen["model"] == "from-env", r.output
