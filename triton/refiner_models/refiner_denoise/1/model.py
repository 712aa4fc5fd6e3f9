"""Ensemble step of base then refiner: the base's latents, stopped where high_noise_frac of the
noise is left, -> the refiner's loop from there on (diffusers' denoising_start), with its own
scheduler, calling its UNet (refiner_unet) by BLS at every step (pipelines/sdxl.py)."""

from pipelines.python_model import PipelineModel
from utils import specs
from utils.request import check_image_count
from utils.sdxl_ensembles import BASE_LATENTS, POOLED_EMBEDDINGS, REFINER_DENOISE


class TritonPythonModel(PipelineModel):
    spec = REFINER_DENOISE
    required = (specs.HIGH_NOISE_FRAC,)  # where the refiner starts

    def compute(self, request, tensors, is_cancelled):
        options = self.pipeline.check_options(request, image_to_image=False)  # the refiner's loop (python_model.py)
        rows = tensors[specs.TEXT_EMBEDDINGS.name].shape[0]  # a prompt's rows: 2 with guidance (unconditional first)
        check_image_count(rows // 2 if options.do_classifier_free_guidance else rows, options.num_images_per_prompt,
                          specs.MAX_PROMPTS)
        return (self.pipeline.denoise(tensors[specs.TEXT_EMBEDDINGS.name], options, is_cancelled=is_cancelled,
                                      pooled_embeddings=tensors[POOLED_EMBEDDINGS.name],
                                      base_latents=tensors[BASE_LATENTS.name]),)
