"""Export the vae encoder of a Stable Diffusion checkpoint to ONNX, with a dynamic batch axis."""

from utils.export import export_cli
from utils.specs import VAE_ENCODER

if __name__ == "__main__":
    export_cli(VAE_ENCODER)
