"""Export SDXL's refiner's UNet (--model: the refiner, e.g. tiny-sdxl-refiner) to ONNX, with its spec's dynamic axes."""

from utils.cli import export_cli, main_entry
from utils.families import REFINER_UNET

if __name__ == "__main__":
    main_entry(lambda: export_cli(REFINER_UNET))
