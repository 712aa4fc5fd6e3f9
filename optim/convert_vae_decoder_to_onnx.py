"""Export the vae decoder of a Stable Diffusion checkpoint to ONNX, with a dynamic batch axis."""

from utils.export import export_cli
from utils.specs import VAE_DECODER

if __name__ == "__main__":
    export_cli(VAE_DECODER)
