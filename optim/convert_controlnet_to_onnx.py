"""Export ControlNets (--controlnet NAME=PATH, for a Stable Diffusion checkpoint) to ONNX, with their spec's dynamic axes."""

from utils.cli import export_cli, main_entry
from utils.specs import CONTROLNET

if __name__ == "__main__":
    main_entry(lambda: export_cli(CONTROLNET))
