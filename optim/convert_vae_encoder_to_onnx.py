"""Export the vae_encoder of a Stable Diffusion checkpoint to ONNX, with its spec's dynamic axes."""

from utils.cli import export_cli, main_entry
from utils.specs import VAE_ENCODER

if __name__ == "__main__":
    main_entry(lambda: export_cli(VAE_ENCODER))
