"""Regenerate the committed config.pbtxt of each pipeline model and ensemble from utils/specs.py."""

import argparse

from utils import specs
from utils.repository import configs
from utils.cli import main_entry
from utils.layout import PROJECT_MODELS, config_file


def main(argv=None):
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    for name in [*specs.PIPELINES, *specs.ENSEMBLES]:
        path = config_file(PROJECT_MODELS, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(configs.to_pbtxt(configs.committed_config(name)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main_entry(main)
