"""Run the README as a user runs it (`make demo`, every walkthrough step, the tests) and record
what each command printed and how long it took; then write the documents that quote the record
(`make docs`), so that the recorded tests check them.

Needs a checkout with nothing generated yet (it says how to get one) and `make tools`; about
half an hour on 2 CPU cores, most of it `make test`.
"""

import argparse

from utils.cli import main_entry
from utils.docs.recording import RECORD, record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tests", dest="tests", action="store_false", help="leave the two test tiers out")
    args = parser.parse_args(argv)
    record(with_tests=args.tests)
    print(f"recorded: {RECORD}; the documents that quote it are written again")


if __name__ == "__main__":
    main_entry(main)
