"""Regenerate the Grafana dashboard (deploy/grafana/sd-triton.json) from utils/operations/dashboard.py."""

import argparse

from utils.operations import dashboard
from utils.cli import main_entry


def main(argv=None):
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    dashboard.PATH.parent.mkdir(parents=True, exist_ok=True)
    dashboard.PATH.write_text(dashboard.to_json())
    print(f"wrote {dashboard.PATH}")


if __name__ == "__main__":
    main_entry(main)
