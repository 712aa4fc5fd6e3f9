"""Export the text encoder of a Stable Diffusion checkpoint to ONNX, with a dynamic batch axis."""

from utils.export import export_cli
from utils.specs import TEXT_ENCODER

if __name__ == "__main__":
    export_cli(TEXT_ENCODER)
