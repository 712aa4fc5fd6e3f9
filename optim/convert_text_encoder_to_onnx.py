"""Export the text_encoder of a Stable Diffusion checkpoint to ONNX, with its spec's dynamic axes."""

from utils.cli import export_cli, main_entry
from utils.specs import TEXT_ENCODER

if __name__ == "__main__":
    main_entry(lambda: export_cli(TEXT_ENCODER))
