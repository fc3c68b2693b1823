"""Compare two pipeline runs' reports client by client: is a change behaviour-preserving?

    python experiments/compare_reports.py BEFORE/report.json AFTER/report.json --out experiments/results/NAME

writes ``NAME.json`` (and prints it): for every numeric per-client field and the ensemble
weights, the largest difference over clients, whether groups and test losses are
identical, and both runs' averages and boosting steps side by side. Runs to compare
must share their config (same preset and seed); the tool checks that the client lists match.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from elora_fed.errors import DataError
from elora_fed.run_dir import write_json


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The per-client and average differences of two reports (see the module docstring)."""
    rows_a = {r["client_id"]: r for r in before["clients"]}
    rows_b = {r["client_id"]: r for r in after["clients"]}
    if rows_a.keys() != rows_b.keys():
        raise DataError(f"the reports have different clients: {len(rows_a)} and {len(rows_b)}")
    fields = [k for k, v in next(iter(rows_a.values())).items() if isinstance(v, int | float) and k != "group"]
    largest = {k: max(abs(float(rows_a[c][k]) - float(rows_b[c][k])) for c in rows_a) for k in fields}
    largest["weights"] = max(
        abs(w - rows_b[c]["weights"].get(g, float("inf"))) for c in rows_a for g, w in rows_a[c]["weights"].items()
    )
    return {
        "clients": len(rows_a),
        "identical_groups": all(rows_a[c]["group"] == rows_b[c]["group"] for c in rows_a),
        "identical_test_losses": all(rows_a[c]["test_loss"] == rows_b[c]["test_loss"] for c in rows_a),
        "largest_difference_per_client": largest,
        "average": {"before": before["average"], "after": after["average"]},
        "boosts": {"before": before["boosts"], "after": after["boosts"]},
        "num_groups": {"before": before["num_groups"], "after": after["num_groups"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path, help="write OUT.json")
    parser.add_argument(
        "--label", action="append", default=[], help="key=value recorded with the result (e.g. commits)"
    )
    args = parser.parse_args()
    result = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    result["labels"] = dict(item.split("=", 1) for item in args.label)
    print(json.dumps(result, indent=2, sort_keys=True))
    if args.out:
        write_json(args.out.with_suffix(".json"), result)


if __name__ == "__main__":
    main()
