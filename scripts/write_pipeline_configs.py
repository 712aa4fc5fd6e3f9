"""Regenerate the committed config.pbtxt of each pipeline model from utils/specs.py."""

import argparse

from utils import configs, specs
from utils.cli import main_entry
from utils.layout import PROJECT_MODELS


def main(argv=None):
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    for pipeline in specs.PIPELINES.values():
        path = PROJECT_MODELS / pipeline.name / "config.pbtxt"
        path.write_text(configs.to_pbtxt(configs.pipeline_config(pipeline)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main_entry(main)
