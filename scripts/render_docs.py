"""Write the generated sections of the README and of the tutorial's chapters (tables, commands,
configs, code excerpts, measured figures) from the project (`make docs`).

With --check, change nothing and fail where a document differs from what the project gives.
"""

import argparse
import difflib

from utils.cli import main_entry
from utils.docs import documents, render
from utils.errors import UserError
from utils.layout import PROJECT_ROOT


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 2 where a document differs")
    args = parser.parse_args(argv)
    differences = []
    for document in documents():
        current = document.read_text()
        rendered = render(current)
        name = str(document.relative_to(PROJECT_ROOT))
        if rendered == current:
            print(f"unchanged: {name}")
        elif args.check:
            differences.append("".join(difflib.unified_diff(current.splitlines(True), rendered.splitlines(True),
                                                            name, "rendered from the project")))
        else:
            document.write_text(rendered)
            print(f"rewrote:   {name}")
    if differences:
        raise UserError("documents differ from the project: run `make docs`.\n" + "\n".join(differences))


if __name__ == "__main__":
    main_entry(main)
