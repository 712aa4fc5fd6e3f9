"""Regenerate the committed config.pbtxt of each pipeline model and ensemble from utils/specs.py (and
base then refiner's, SDXL's own, from utils/sdxl_ensembles.py)."""

import argparse

from utils.repository import configs
from utils.cli import main_entry
from utils.layout import CONFIG_FILE


def main(argv=None):
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    for name in configs.committed_models():
        path = configs.committed_folder(name) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(configs.to_pbtxt(configs.committed_config(name)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main_entry(main)
