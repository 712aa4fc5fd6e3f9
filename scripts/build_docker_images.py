"""Build the two images of this tutorial from one NGC release (utils/docker.py): export and serving."""

import shlex
import subprocess

from utils.cli import main_entry, script_parser
from utils.docker import build_commands


def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.parse_args(argv)
    for command in build_commands():
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main_entry(main)
