"""Export the unet of a Stable Diffusion checkpoint to ONNX, with a dynamic batch axis."""

from utils.cli import main_entry
from utils.export import export_cli
from utils.specs import UNET

if __name__ == "__main__":
    main_entry(lambda: export_cli(UNET))
