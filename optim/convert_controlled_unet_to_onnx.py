"""Export the UNet that adds a ControlNet's residuals (controlled_unet) of a Stable Diffusion checkpoint to ONNX, with its spec's dynamic axes."""

from utils.cli import export_cli, main_entry
from utils.specs import CONTROLLED_UNET

if __name__ == "__main__":
    main_entry(lambda: export_cli(CONTROLLED_UNET))
