"""Write the README's generated sections (tables, commands, caps) from the code (`make docs`).

With --check, change nothing and fail when a section differs from what the code says.
"""

import argparse
import difflib

from utils.cli import main_entry
from utils.docs import render
from utils.errors import UserError
from utils.layout import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 2 where the README differs")
    args = parser.parse_args(argv)
    current = README.read_text()
    rendered = render(current)
    if args.check:
        if rendered != current:
            diff = "".join(difflib.unified_diff(current.splitlines(True), rendered.splitlines(True),
                                                "README.md", "rendered from the code"))
            raise UserError(f"README.md differs from the code: run `make docs`.\n{diff}")
        print("README.md agrees with the code")
        return
    README.write_text(rendered)
    print(f"{'rewrote' if rendered != current else 'unchanged:'} {README}")


if __name__ == "__main__":
    main_entry(main)
