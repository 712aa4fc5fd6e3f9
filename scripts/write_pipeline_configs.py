"""Regenerate the committed config.pbtxt of each pipeline model from utils/specs.py."""

from utils import configs, specs
from utils.repository import PROJECT_MODELS


def main():
    for pipeline in specs.PIPELINES.values():
        path = PROJECT_MODELS / pipeline.name / "config.pbtxt"
        path.write_text(configs.to_pbtxt(configs.pipeline_config(pipeline)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
