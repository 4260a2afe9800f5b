"""Every flag of every script explains itself in --help, from the comment beside its constant, with its default."""
import argparse
import importlib

import pytest

from runs.cli import constant_comments, explain_flags

SCRIPTS = ["prepare_data", "train_hash", "gen_trigger", "gen_confusing", "poison_dataset", "train_backdoor",
           "evaluate", "table1", "table2", "table3", "defend", "table_defenses", "figures",
           *(f"bench.{name}" for name in ("class_map", "confusing", "demo_effect", "faults", "map_at_r",
                                          "noise_as_trigger", "perturbation_transfer", "pretrained_features",
                                          "train_step", "train_throughput", "trigger", "trigger_convergence"))]


def parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script's parse_args builds, caught when --help is parsed."""
    seen = []
    original = argparse.ArgumentParser.parse_known_args

    def catch(self, args=None, namespace=None):
        seen.append(self)
        return original(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module_name).parse_args(["--help"])
    assert stop.value.code == 0
    return seen[0]


@pytest.mark.parametrize("module_name", SCRIPTS)
def test_every_flag_has_a_help_text_and_shows_its_default(module_name, monkeypatch, capsys):
    parser = parser_of(module_name, monkeypatch)
    shown = capsys.readouterr().out
    flags = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert flags
    silent = [a.option_strings[0] for a in flags if not a.help]
    assert not silent, f"{module_name}.py: flags without a help text (comment their constants): {silent}"
    assert all("%(default)" in a.help for a in flags)
    comments = constant_comments(module_name.replace(".", "/") + ".py")
    for action in flags:  # one source: the help text is the constant's comment
        if action.dest.upper() in comments:
            assert action.help.startswith(comments[action.dest.upper()].replace("%", "%%")), action.dest
    assert "(default: " in shown


def test_comments_are_read_beside_their_constants(tmp_path):
    source = tmp_path / "script.py"
    source.write_text('"""Doc."""\nEPOCHS = 30  # passes over the data\nLR = 1e-3\nNAMES = ["a",  # first\n'
                      '         "b"]  # second\nlower = 1  # not a constant\nRATE = 5  # 5 % of the list\n')
    assert constant_comments(source) == {"EPOCHS": "passes over the data", "NAMES": "first second",
                                         "RATE": "5 % of the list"}
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rate", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="by hand")
    explain_flags(parser, source)
    text = parser.format_help()
    assert "passes over the data (default: 30)" in text and "5 % of the list (default: 5)" in text
    assert "by hand (default: 0)" in text and "--lr LR\n" in text  # no comment, no help text


def test_no_module_cites_a_file_outside_the_repository():
    """Definitions are cited from the repository's own docs (docs/method.md), never from files users do not have."""
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    sources = [p for p in repo.rglob("*.py") if "tests" not in p.parts and not p.name.startswith(".")]
    sources += [repo / "README.md", *(repo / "docs").glob("*.md"), repo / "run_demo.sh"]
    outside = [f"{p.relative_to(repo)}: {word}" for p in sources for word in ("DESIGN.md", "../shared", "seeds/")
               if word in p.read_text()]
    assert not outside, outside
    assert (repo / "docs" / "method.md").is_file()


# constants whose generic edit fails their own validation: an edit that passes it
VALID_EDITS = {("train_hash", "ARCH"): "resnet18", ("train_hash", "HEAD"): "spatial", ("train_hash", "LOSS"): "dch",
               ("train_hash", "RESIZE_SIZE"): 300, ("figures", "TABLE"): ["other/table1.json"],
               ("bench.map_at_r", "SIZES"): ["10x20", "30x40"], ("bench.map_at_r", "CLASSES"): [5, 7]}
SKIPPED = {("gen_confusing", "SETTING")}  # poison-label is refused with the default --pert confusing (tested there)


def edited(action: argparse.Action, value):
    """Another value of the flag's kind: the next choice, the other boolean, a changed number, string or list."""
    if action.choices:
        return next(c for c in action.choices if c != value)
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        return not value
    if action.nargs in ("+", "*"):
        if value and len(value) > 1:
            return list(value[1:])
        kind = action.type or str
        return [edited_scalar(kind, value[0] if value else None)]
    return edited_scalar(action.type or str, value)


def edited_scalar(kind, value):
    if kind is int:
        return 3 if value is None else value + 3
    if kind is float:
        return 0.5 if value is None else value * 0.5
    return "edited" if value is None else f"{value}-edited"


@pytest.mark.parametrize("module_name", SCRIPTS)
def test_a_constant_edited_at_the_top_is_what_parse_args_returns(module_name, monkeypatch):
    """The user's way of working: edit a constant at the top of a script and run it. One constant at a time, every
    constant that has a flag must reach parse_args([]) unchanged (no recipe or other default may override it)."""
    parser = parser_of(module_name, monkeypatch)
    monkeypatch.undo()
    module = importlib.import_module(module_name)
    checked = 0
    for action in parser._actions:
        name = action.dest.upper()
        if not action.option_strings or not hasattr(module, name) or (module_name, name) in SKIPPED:
            continue
        value = VALID_EDITS.get((module_name, name), edited(action, getattr(module, name)))
        with monkeypatch.context() as patch:
            patch.setattr(module, name, value)
            parsed = module.parse_args([])
        args = parsed[0] if isinstance(parsed, tuple) else parsed
        got = getattr(args, action.dest)
        assert (list(got) if isinstance(value, list) else got) == value, f"{module_name}.{name}: {value!r} -> {got!r}"
        checked += 1
    assert checked >= 2
