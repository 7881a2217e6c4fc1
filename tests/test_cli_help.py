"""The help teaches what is true: per-command defaults, text rich would swallow, and options every
front end promises (``bagel ui --share``)."""

from __future__ import annotations

import re

import pytest
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


def test_each_command_takes_the_knobs_it_names_and_no_other():
    """The knob options are declared once and given per command (``with_knobs``): every command shows the
    groups it takes; a suite that fixes a knob does not offer it."""
    for command in ("generate", "edit", "batch"):
        text = help_text(command)
        for option in ("--cfg-text-scale", "--cfg-img-scale", "--cfg-interval", "--cfg-renorm-type", "--cfg-renorm-min",
                       "--timestep-shift", "--num-timesteps", "--max-think-tokens", "--do-sample", "--temperature"):
            assert option in text, (command, option)
    assert "--guidance-scale" in help_text("generate") and "--guidance-scale" not in help_text("batch")
    geneval = help_text("eval", "geneval")
    assert "--cfg-text-scale" in geneval and "--cfg-img-scale" not in geneval and "--cfg-renorm-min" not in geneval
    assert "--cfg-img-scale" in help_text("eval", "imgedit") and "--max-new-tokens" in help_text("chat")


def test_an_option_declared_twice_is_refused():
    from bagel_engine.cli.jobs import SAMPLING, with_knobs

    def command(do_sample: bool = False, knobs: dict | None = None) -> None:
        pass

    with pytest.raises(TypeError, match="declares do_sample itself"):
        with_knobs(SAMPLING)(command)


def test_fp32_is_dtype_float32_for_the_official_suites_and_refuses_another_dtype():
    import json

    for suite in ("geneval", "wise", "gedit", "imgedit", "kris", "rise", "shapes"):
        assert "--fp32" in help_text("eval", suite), suite
    r = RUNNER.invoke(cli_main.app, ["eval", "shapes", "-m", "bagel-shapes", "--fp32", "--task", "vqa", "--n", "1",
                                     "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["params"]["load"]["dtype"] == "float32"
    r = RUNNER.invoke(cli_main.app, ["eval", "shapes", "-m", "bagel-shapes", "--fp32", "--dtype", "bfloat16"])
    assert r.exit_code == 2 and "--fp32 asks for float32 and --dtype for bfloat16" in r.output
