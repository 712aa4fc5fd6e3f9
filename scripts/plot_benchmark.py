"""Draw the chart of a benchmark JSON (for results from a machine without matplotlib)."""

import json
import sys
from pathlib import Path

from utils.benchmark import chart, table


def main(argv=None):
    for path in map(Path, argv or sys.argv[1:]):
        results = json.loads(path.read_text())
        print(table(results))
        print(f"chart: {chart(results, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
