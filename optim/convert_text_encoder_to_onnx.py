"""Export the text_encoder of a Stable Diffusion checkpoint to ONNX, with a dynamic batch axis."""

from utils.cli import main_entry
from utils.export import export_cli
from utils.specs import TEXT_ENCODER

if __name__ == "__main__":
    main_entry(lambda: export_cli(TEXT_ENCODER))
