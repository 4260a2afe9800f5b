"""The paper's Table 2 in one command: Table 1's rows for victims of other hashing losses (HashNet, DCH).

    python table2.py --runs checkpoint/c100-hashnet-48 checkpoint/c100-dch-48 --targets 2 3 4

Each run holds a clean model (step 1) trained with its own `--loss` (train_hash.py --loss hashnet, --loss dch, or any
other). The runs are grouped by loss, and each group (one run per bit length) is a Table 1: table1.py on the group,
written to OUT/<loss>/, with every flag this script does not know passed on to it (--targets, --methods,
--trigger-size, --poison-num, ...; checked before anything runs). Finished steps are reused as in table1.py, so an
interrupted table continues where it stopped.

Writes OUT/ (default: the first run's folder /table2): table2.md (one block per loss in the paper's layout: loss,
method, metric, one column per bit length; t-MAP and MAP in %, the mean over the targets), table2.csv, table2.json
(settings, each block's rows, provenance), and each loss's table1.* under OUT/<loss>/.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import table1
from models.hash_network import read_clean
from runs import UserError, atomic_write_text, cli_entry, provenance, write_json
from runs.tables import command_line, csv_text, markdown_table, without_seconds
from runs.cli import explain_flags

RUNS = ["checkpoint/cifar10-hashnet-48", "checkpoint/cifar10-dch-48"]  # one run per loss, each with its clean model
OUT = None  # None: RUNS[0]/table2


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--runs", nargs="+", default=RUNS)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    args, passed_on = p.parse_known_args(argv)
    if any(arg in ("--gpus", "--print-commands") or arg.startswith(("--gpus=", "--print-commands="))
           for arg in passed_on):
        raise UserError("table2.py runs its Table 1 blocks one after the other; spread a block over GPUs with "
                        "table1.py --gpus on that loss's runs (its out folder: OUT/<loss>), then run table2.py to "
                        "assemble")
    table1.parse_args(["--runs", *args.runs, *passed_on])  # table1.py's own checks, before anything runs
    return args, passed_on


def main(argv: list[str] | None = None) -> dict:
    args, passed_on = parse_args(argv)
    groups: dict[str, list[str]] = {}
    for run in args.runs:
        groups.setdefault(read_clean(run)[0]["loss"], []).append(run)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "table2"
    print(f"Table 2: {len(groups)} loss(es): " + "; ".join(f"{loss}: {', '.join(runs)}"
                                                          for loss, runs in groups.items()))
    blocks = {}
    for loss, runs in groups.items():
        made = table1.main(["--runs", *runs, "--out", str(out / loss), *passed_on])
        blocks[loss] = {"rows": without_seconds(made["rows"]),
                        "table": list(csv.reader((out / loss / "table1.csv").open()))}
    bits = sorted({int(column.split()[0]) for block in blocks.values() for column in block["table"][0][2:]})
    header = ["Loss", "Method", "Metric", *[f"{b} bits" for b in bits]]
    table = []
    for loss, block in blocks.items():
        columns = block["table"][0][2:]
        for method, metric, *values in block["table"][1:]:
            by_bits = dict(zip(columns, values))
            table.append([loss, method, metric, *[by_bits.get(f"{b} bits", "-") for b in bits]])
    markdown = "\n".join(["t-MAP (%) and MAP (%), mean over the targets, one block per hashing loss; each block is "
                          "the Table 1 in OUT/<loss>/table1.md (its settings and per-target rows are there).", "",
                          *markdown_table(header, table)]) + "\n"
    atomic_write_text(markdown, out / "table2.md")
    atomic_write_text(csv_text([header, *table]), out / "table2.csv")
    write_json({"settings": vars(args), "passed_on": passed_on, "groups": groups,
                "command": command_line("table2.py"), "blocks": {loss: block["rows"] for loss, block in blocks.items()},
                "provenance": provenance()}, out / "table2.json")
    print(markdown)
    return {"groups": groups, "table": table, "out": str(out), "markdown": markdown}


if __name__ == "__main__":
    cli_entry(main)
