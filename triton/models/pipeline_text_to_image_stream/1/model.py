"""Server-side text to image with live progress: a decoupled (streaming) BLS model.

The same loop as pipeline_text_to_image, with a response every ``preview_every`` steps: the
steps done, of how many, and a preview of each image made from the latents without the VAE
decoder (StableDiffusion.preview); then the decoded images, flagged final. A client that closes
its stream cancels the request: the loop stops at its next step (pipelines/python_model.py
turns that into a CANCELLED answer nobody waits for).
"""

from pipelines.python_model import BlsPipelineModel
from utils import specs
from utils.request import DEFAULT_PREVIEW_EVERY, InvalidRequest


class TritonPythonModel(BlsPipelineModel):
    spec = specs.TEXT_TO_IMAGE_STREAM

    def compute(self, request, tensors, is_cancelled):
        every = preview_every(tensors.get(specs.PREVIEW_EVERY.name))
        progress = {"done": 0, "total": 0}

        def on_step(done, total, latents):
            progress.update(done=done, total=total)
            if every and done % every == 0 and done < total:  # the last step's picture is the final image
                self.send((done, total, self.pipeline.preview(latents), False))

        images = self.pipeline(request, is_cancelled=is_cancelled, on_step=on_step)
        return progress["done"], progress["total"], images, True


def preview_every(value) -> int:
    if value is None:
        return DEFAULT_PREVIEW_EVERY
    if value.numel() != 1:
        raise InvalidRequest(f"preview_every has {value.numel()} values: send exactly one, shape [1].")
    every = int(value.reshape(-1)[0])
    if every < 0:
        raise InvalidRequest(f"preview_every={every} is not allowed: use a number of steps (1: every step), "
                             f"or 0 for no previews.")
    return every
