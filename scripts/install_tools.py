"""Install the tools the operations steps and the tests run that pip does not install (`make tools`):
perf_analyzer, prometheus and promtool, mermaid's CLI with Debian's chromium, under .tools/."""

import argparse

from utils.cli import main_entry
from utils.operations.tools import install


def main(argv=None):
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    install()


if __name__ == "__main__":
    main_entry(main)
