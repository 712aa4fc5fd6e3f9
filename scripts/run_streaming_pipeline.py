"""Text to image (or, with --image, image to image) from a streaming (decoupled) BLS model, which
sends the steps done and a preview every --preview-every steps, then the images. Ctrl+C closes
the stream, which cancels the request on the server."""

from pathlib import Path

from tqdm import tqdm

from pipelines.streaming import StreamingPipeline
from utils.cli import add_generation_arguments, generation_options, main_entry, save_images, script_parser
from utils.grpc_client import DEFAULT_URL
from utils.request import DEFAULT_PREVIEW_EVERY


def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address")
    parser.add_argument("--output", default=Path("outputs/stream.png"), type=Path)
    parser.add_argument("--previews", default=Path("outputs/previews"), type=Path,
                        help="folder for the previews, one PNG per image and step (the latents' size, H/8 x W/8)")
    parser.add_argument("--preview-every", type=int, default=DEFAULT_PREVIEW_EVERY,
                        help="a preview every this many steps (0: progress only at the end)")
    add_generation_arguments(parser)
    args = parser.parse_args(argv)
    previews, bar = [], None
    try:
        for progress in StreamingPipeline(args.url).stream(preview_every=args.preview_every,
                                                           **generation_options(args)):
            bar = bar or tqdm(total=progress.total_steps, desc="denoising on the server", unit="call")
            bar.update(progress.step - bar.n)
            if progress.final:
                images = progress.images
            else:
                previews += save_images(progress.images, args.previews / f"step-{progress.step:03d}.png")
    finally:
        if bar is not None:
            bar.close()
    if previews:
        print(f"saved {len(previews)} previews in {args.previews} ({progress_size(previews[0])} each)")
    for path in save_images(images, args.output):
        # The stream counts UNet calls, which a scheduler may make more of than the steps asked
        # for (PNDM: one more).
        print(f"saved {path} ({images.shape[2]}x{images.shape[1]}, {args.num_inference_steps} steps, "
              f"{progress.total_steps} UNet calls)")


def progress_size(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return f"{image.width}x{image.height}"


if __name__ == "__main__":
    main_entry(main)
