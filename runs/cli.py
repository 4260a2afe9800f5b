"""Command-line help from the constants at the top of a script: the comment beside a constant is its flag's help."""
from __future__ import annotations

import argparse
import ast
import io
import tokenize
from pathlib import Path


def constant_comments(source_file: str | Path) -> dict[str, str]:
    """NAME -> the comment written beside `NAME = value` at the top level of a file (on any line of the value)."""
    text = Path(source_file).read_text()
    comment_on_line: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            comment_on_line[token.start[0]] = token.string.lstrip("#").strip()
    comments = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            words = [comment_on_line[n] for n in range(node.lineno, node.end_lineno + 1) if n in comment_on_line]
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper() and words:
                    comments[target.id] = " ".join(words)
    return comments


def explain_flags(parser: argparse.ArgumentParser, source_file: str | Path) -> argparse.ArgumentParser:
    """Give every flag without a help text the comment beside its constant (--batch-size: BATCH_SIZE), and show
    every flag's default in --help."""
    comments = constant_comments(source_file)
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        if action.help is None and action.dest.upper() in comments:
            action.help = comments[action.dest.upper()].replace("%", "%%")
        if action.help and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"
    return parser
