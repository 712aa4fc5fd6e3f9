"""Print the table and draw the chart of benchmark JSON files (for results from a machine
without matplotlib, or to draw them again)."""

import argparse
import json
from pathlib import Path

from utils.benchmark import chart, table
from utils.cli import main_entry
from utils.errors import UsageError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by benchmark_pipelines.py")
    args = parser.parse_args(argv)
    for path in args.results:
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise UsageError(f"{path}: not a benchmark JSON ({error}): pass a file benchmark_pipelines.py wrote.")
        print(table(results))
        print(f"chart: {chart(results, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main_entry(main)
