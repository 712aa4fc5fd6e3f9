"""Export SDXL's second text encoder (OpenCLIP bigG, with its pooled projection) to ONNX, with its spec's dynamic axes."""

from utils.cli import export_cli, main_entry
from utils.families import TEXT_ENCODER_2

if __name__ == "__main__":
    main_entry(lambda: export_cli(TEXT_ENCODER_2))
