"""The whole walkthrough in one command, on the offline tiny model and a CPU (`make demo`).

Builds the tiny random pipeline, exports its four networks to ONNX, writes the Triton model
repository (portable python backend), starts the local Triton server, generates one image each
way (client-side, BLS, ensemble), then an image-to-image result from the BLS image, the BLS image
with its middle repainted (inpainting), an image with a LoRA adapter (a random one, served as a
UNet of its own) and one guided by the BLS image's edges (a random ControlNet), saves them all,
and stops the server. An SDXL model (--model tiny-sdxl) gets its own tour: an image each way, image
to image, and base then refiner (LoRA, ControlNet and inpainting are SD1.x's).
Each stage is the code of a walkthrough step (utils/walkthrough.py numbers them); this runs them in a row.
"""

import argparse
from contextlib import contextmanager
from pathlib import Path

from pipelines.bls import BlsPipeline
from pipelines.client_side import ClientSidePipeline
from pipelines.ensemble import EnsemblePipeline
from utils.cli import add_generation_arguments, generation_options, lora_argument, main_entry, save_images
from utils.controlnet import ServedControlNet
from utils.deployment import Deployment
from utils.export import DEFAULT_ONNX_DIR
from utils.layout import DEFAULT_REPOSITORY, SDXL_REPOSITORY
from utils.families import SDXL, family_of
from utils.model_dims import ModelDims
from utils.models import DEFAULT_MODELS_DIR, resolve_model
from utils.mask import box_mask
from utils.server import TritonServer, stop_on_sigterm
from utils.timing import StepTimer
from utils.walkthrough import CONTROLNET_PROMPT, IMAGE_TO_IMAGE_PROMPT, IMAGE_TO_IMAGE_STRENGTH, INPAINT_PROMPT, heading
from utils.workflow import prepare_repository


DEMO_ADAPTER = "style=tiny"
DEMO_CONTROLNET = "edges=tiny"  # a random ControlNet built for the model
DEMO_REFINERS = {"tiny-sdxl": "tiny-sdxl-refiner", "sdxl-random": "sdxl-refiner-random"}  # SDXL: the preset's refiner


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="preset, local diffusers folder or hub id (default: tiny)")
    parser.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, type=Path)
    parser.add_argument("--onnx-dir", default=DEFAULT_ONNX_DIR, type=Path)
    parser.add_argument("--repository", default=None, type=Path,
                        help=f"default: {DEFAULT_REPOSITORY} ({SDXL_REPOSITORY} for an SDXL model)")
    parser.add_argument("--output-dir", default=Path("outputs"), type=Path, help="where the images go")
    parser.add_argument("--force", action="store_true", help="redo finished exports and overwrite repository files")
    parser.add_argument("--lora", dest="adapters", action="append", type=lora_argument, metavar="NAME=PATH",
                        default=None, help=f"serve this LoRA adapter and show an image with it (repeatable; default: "
                                           f"{DEMO_ADAPTER}, a random one built for the model)")
    parser.add_argument("--refiner", default=None, help="SDXL: the refiner to serve (default: the preset's, "
                                                         "e.g. tiny-sdxl-refiner for tiny-sdxl)")
    add_generation_arguments(parser)
    args = parser.parse_args(argv)
    if family_of(ModelDims.from_pretrained(resolve_model(args.model, args.models_dir))) is SDXL:
        args.repository = args.repository or SDXL_REPOSITORY
        return sdxl_tour(args)
    args.repository = args.repository or DEFAULT_REPOSITORY
    args.adapters = args.adapters if args.adapters is not None else [lora_argument(DEMO_ADAPTER)]
    timer, saved = StepTimer(), []
    deployment = Deployment(adapters=tuple(args.adapters), controlnets=(ServedControlNet.parse(DEMO_CONTROLNET),))
    with served(args, deployment, timer) as (model_dir, server):
        with timer.step(heading("5")):
            client_side = ClientSidePipeline(model_dir, server.grpc_url)(**generation_options(args))
            saved += save_images(client_side, args.output_dir / "client_side.png")
        with timer.step(heading("6")):
            bls = BlsPipeline(server.grpc_url)(**generation_options(args))
            saved += save_images(bls, args.output_dir / "bls.png")
            difference = abs(client_side.astype(int) - bls).max()
            print(f"    max pixel difference between the two images: {difference} (same loop, same seed)")
        with timer.step(heading("7", "the ensemble")):
            ensemble = EnsemblePipeline(server.grpc_url)(**generation_options(args))
            saved += save_images(ensemble, args.output_dir / "ensemble.png")
            print(f"    max pixel difference to the BLS image: {abs(ensemble.astype(int) - bls).max()}")
        saved += from_the_bls_image(server.grpc_url, bls, args, timer)
        saved += guided_by_the_bls_image(server.grpc_url, bls, args, timer)
        for adapter in deployment.adapters:
            with timer.step(heading("7", f"the LoRA adapter {adapter.name!r}, chosen per request")):
                images = BlsPipeline(server.grpc_url)(**generation_options(args) | dict(lora=[adapter.name]))
                saved += save_images(images, args.output_dir / f"lora_{adapter.name}.png")
                print(f"    max pixel difference to the BLS image without it: {abs(images.astype(int) - bls).max()}")
    summary(saved, timer)


@contextmanager
def served(args, deployment: Deployment, timer: StepTimer):
    """Steps 1-4 for ``deployment``: the model, its exports and repository, then a local Triton
    serving it, stopped on leaving (and on a `kill`); yields the model's folder and the server."""
    stop_on_sigterm()  # a `kill` stops the server this script started, too
    model_dir = prepare_repository(args.model, args.repository, deployment, models_dir=args.models_dir,
                                   onnx_dir=args.onnx_dir, force=args.force, timer=timer)
    with timer.step(heading("4", "tritonserver of nvidia-pytriton, on 127.0.0.1")):
        server = TritonServer(args.repository).start()
        print(f"    gRPC {server.grpc_url}, log {server.log_file}")
    try:
        yield model_dir, server
    finally:
        with timer.step("stop Triton"):
            server.stop()


def summary(saved: list[Path], timer: StepTimer) -> None:
    print("\nImages:")
    for path in saved:
        print(f"  {path}")
    print("\nTimes:")
    print(timer.table())


def from_the_bls_image(url: str, bls, args, timer: StepTimer) -> list[Path]:
    """Image to image, then inpainting (its middle repainted), from the first BLS image, through
    the ensembles. That image sets the size: height and width are text to image's options."""
    saved = []
    with timer.step(heading("7", "image to image from the BLS image")):
        options = generation_options(args) | dict(prompt=IMAGE_TO_IMAGE_PROMPT, image=bls[:1],
                                                  strength=IMAGE_TO_IMAGE_STRENGTH, height=None, width=None)
        saved += save_images(EnsemblePipeline(url)(**options), args.output_dir / "image_to_image.png")
    with timer.step(heading("7", "inpainting: the BLS image's middle repainted")):
        options = generation_options(args) | dict(prompt=INPAINT_PROMPT, image=bls[:1], height=None, width=None,
                                                  mask_image=box_mask(*bls.shape[1:3]))  # white: repainted
        saved += save_images(EnsemblePipeline(url)(**options), args.output_dir / "inpaint.png")
    return saved


def guided_by_the_bls_image(url: str, bls, args, timer: StepTimer) -> list[Path]:
    """ControlNet: the BLS image sent as a photo, whose edges the server makes (control_mode canny)
    and the demo's ControlNet follows, with another prompt."""
    with timer.step(heading("7", "ControlNet: the BLS image's edges guide another prompt")):
        options = generation_options(args) | dict(prompt=CONTROLNET_PROMPT, control_image=bls[:1],
                                                  control_mode=["canny"], height=None, width=None)
        images = BlsPipeline(url)(**options)
        print(f"    max pixel difference to the BLS image, whose edges guided it: "
              f"{abs(images.astype(int) - bls[:1]).max()}")
        return save_images(images, args.output_dir / "controlnet.png")


def sdxl_tour(args) -> None:
    """SDXL's walkthrough: the base (and its refiner) exported and served, an image each way
    (client-side, BLS, ensemble), image to image from it, then base and refiner (high_noise_frac) by
    BLS and through its ensemble of ensembles, with the same seed."""
    timer, saved = StepTimer(), []
    refiner = args.refiner or DEMO_REFINERS.get(args.model)
    with served(args, Deployment(refiner=refiner), timer) as (model_dir, server):
        refiner_dir = refiner and resolve_model(refiner, args.models_dir)
        with timer.step(heading("5")):
            client_side = ClientSidePipeline(model_dir, server.grpc_url, refiner=refiner_dir)(**generation_options(args))
            saved += save_images(client_side, args.output_dir / "sdxl_client_side.png")
        bls = BlsPipeline(server.grpc_url)
        with timer.step(heading("6")):
            base = bls(**generation_options(args))
            saved += save_images(base, args.output_dir / "sdxl_bls.png")
            print(f"    max pixel difference between the two images: {abs(client_side.astype(int) - base).max()}")
        with timer.step(heading("7", "the ensemble")):
            ensemble = EnsemblePipeline(server.grpc_url)(**generation_options(args))
            saved += save_images(ensemble, args.output_dir / "sdxl_ensemble.png")
            print(f"    max pixel difference to the BLS image: {abs(ensemble.astype(int) - base).max()}")
        with timer.step("7. SDXL image to image from the BLS image, through the ensemble"):
            options = generation_options(args) | dict(prompt=IMAGE_TO_IMAGE_PROMPT, image=base[:1], height=None,
                                                      width=None)
            saved += save_images(EnsemblePipeline(server.grpc_url)(**options),
                                 args.output_dir / "sdxl_image_to_image.png")
        if refiner:
            with timer.step("7. SDXL base then refiner (high_noise_frac 0.8)"):
                refined = bls(**generation_options(args) | dict(high_noise_frac=0.8))
                saved += save_images(refined, args.output_dir / "sdxl_refined.png")
                print(f"    max pixel difference to the base alone: {abs(refined.astype(int) - base).max()}")
            with timer.step("7. SDXL base then refiner, through the ensemble of ensembles"):
                ensemble = EnsemblePipeline(server.grpc_url)(**generation_options(args) | dict(high_noise_frac=0.8))
                print(f"    max pixel difference to the BLS pipeline's: {abs(ensemble.astype(int) - refined).max()}")
    summary(saved, timer)


if __name__ == "__main__":
    main_entry(main)
