"""Write the generated sections of the README and of every page under docs/ (tables, commands,
configs, code excerpts, diagrams, recorded figures) from the project (`make docs`).

With --check, change nothing and fail where a document differs from what the project gives.
"""

import argparse
import difflib

from utils.cli import main_entry
from utils.docs import documents, render, write_documents
from utils.errors import UserError
from utils.layout import PROJECT_ROOT


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 2 where a document differs")
    args = parser.parse_args(argv)
    if not args.check:
        for document in write_documents():
            print(f"rewrote: {document.relative_to(PROJECT_ROOT)}")
        return
    differences = []
    for document in documents():
        current, rendered = document.read_text(), render(document.read_text())
        if rendered != current:
            name = str(document.relative_to(PROJECT_ROOT))
            differences.append("".join(difflib.unified_diff(current.splitlines(True), rendered.splitlines(True),
                                                            name, "rendered from the project")))
    if differences:
        raise UserError("documents differ from the project: run `make docs`.\n" + "\n".join(differences))


if __name__ == "__main__":
    main_entry(main)
