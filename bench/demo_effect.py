"""Check (not a speed figure): does a Table 1 show the backdoor the way the paper says CIBA does?

    bash run_demo.sh && python bench/demo_effect.py --table checkpoint/demo-photos/table1/table1.json

Reads a table1.py result (table1.json) and checks, on the means over its targets, the three claims a demo of CIBA
has to show: CIBA's t-MAP at least --min-gain points (default 30) above the None row's (the clean model with the
trigger), CIBA's t-MAP above Tri's, and CIBA's MAP within --max-map-drop points (default 2) of the clean model's.
Prints each claim with its numbers and PASS or FAIL, writes them with --out, and exits 1 when a claim fails, so a
script can run it after the demo. It is a check of a result, never part of the timed test suite: the demo's numbers
move from machine to machine by a few points.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runs.cli import explain_flags  # noqa: E402
from runs import UserError, cli_entry, provenance, read_json, write_json  # noqa: E402

TABLE = "checkpoint/demo-photos/table1/table1.json"  # table1.json of the photo demo (run_demo.sh)
MIN_GAIN = 30.0  # points of t-MAP CIBA must gain over None
MAX_MAP_DROP = 2.0  # points of MAP CIBA may lose against the clean model
OUT = None  # JSON file for the verdicts; None: print only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default=TABLE)
    p.add_argument("--min-gain", type=float, default=MIN_GAIN)
    p.add_argument("--max-map-drop", type=float, default=MAX_MAP_DROP)
    p.add_argument("--out", default=OUT)
    explain_flags(p, __file__)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    path = Path(args.table)
    if not path.is_file():
        raise UserError(f"{path} does not exist; run bash run_demo.sh (or table1.py) first, or give --table")
    means = method_means(read_json(path)["rows"], path)
    none, tri, ciba = means["None"], means["Tri"], means["CIBA"]
    claims = [
        {"claim": f"CIBA's t-MAP at least {args.min_gain:g} points above None's",
         "values": f"CIBA {ciba['t_map']:.2f}, None {none['t_map']:.2f} (gain {ciba['t_map'] - none['t_map']:.2f})",
         "passed": ciba["t_map"] - none["t_map"] >= args.min_gain},
        {"claim": "CIBA's t-MAP above Tri's", "values": f"CIBA {ciba['t_map']:.2f}, Tri {tri['t_map']:.2f}",
         "passed": ciba["t_map"] > tri["t_map"]},
        {"claim": f"CIBA's MAP within {args.max_map_drop:g} points of the clean model's",
         "values": f"CIBA {ciba['map']:.2f}, clean {ciba['clean_map']:.2f}",
         "passed": ciba["clean_map"] - ciba["map"] <= args.max_map_drop},
    ]
    for claim in claims:
        print(f"{'PASS' if claim['passed'] else 'FAIL'}  {claim['claim']}: {claim['values']}")
    record = {"settings": vars(args), "means": means, "claims": claims,
              "passed": all(c["passed"] for c in claims), "provenance": provenance()}
    if args.out:
        write_json(record, Path(args.out))
    if not record["passed"]:
        raise SystemExit(1)
    return record


def method_means(rows: list[dict], path: Path) -> dict[str, dict[str, float]]:
    """t-MAP, MAP and clean MAP in % of None, Tri and CIBA, means over the targets of the rows."""
    means = {}
    for method in ("None", "Tri", "CIBA"):
        mine = [row for row in rows if row["method"] == method]
        if not mine:
            raise UserError(f"{path} has no {method} row; run table1.py with --methods None Tri CIBA (at least)")
        means[method] = {key: 100 * sum(row[key] for row in mine) / len(mine) for key in ("t_map", "map", "clean_map")}
    return means


if __name__ == "__main__":
    cli_entry(main)
