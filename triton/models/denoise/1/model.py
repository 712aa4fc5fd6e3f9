"""Ensemble step: text embeddings (and, for image to image, the VAE encoder's parameters; for
inpainting, the mask and the masked image's parameters too) -> latents for the VAE decoder. The
loop repeats with a scheduler, which no static ensemble graph can express: it runs here and calls
the UNet by BLS at every step."""

from pipelines.python_model import PipelineModel
from utils import sdxl_ensembles, specs
from utils.request import check_image_count

TEXT_EMBEDDINGS, LATENT_PARAMETERS = specs.TEXT_EMBEDDINGS.name, specs.LATENT_PARAMETERS.name
MASKED_LATENT_PARAMETERS = specs.MASKED_LATENT_PARAMETERS.name
POOLED_EMBEDDINGS = sdxl_ensembles.POOLED_EMBEDDINGS.name  # SDXL's pooled text


class TritonPythonModel(PipelineModel):
    spec = specs.DENOISE

    def prepare(self):
        self.pipeline.warm_up(tokenize=False)  # so that the first request does not pay for lazy initialization

    def compute(self, request, tensors, is_cancelled):
        latent_parameters = tensors.get(LATENT_PARAMETERS)
        image_to_image = latent_parameters is not None or request.mask_image is not None
        options = self.pipeline.check_options(request, image_to_image=image_to_image)
        rows = tensors[TEXT_EMBEDDINGS].shape[0]  # a prompt's rows: 2 with guidance (unconditional first)
        check_image_count(rows // 2 if options.do_classifier_free_guidance else rows, options.num_images_per_prompt,
                          specs.MAX_PROMPTS)  # before the loop: a client may call this step directly
        return (self.pipeline.denoise(tensors[TEXT_EMBEDDINGS], options, latent_parameters, is_cancelled=is_cancelled,
                                      masked_latent_parameters=tensors.get(MASKED_LATENT_PARAMETERS),
                                      pooled_embeddings=tensors.get(POOLED_EMBEDDINGS)),)
