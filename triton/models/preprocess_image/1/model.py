"""Ensemble step: uint8 RGB images [N, H, W, 3] -> the VAE encoder's input, [N, 3, H, W] in [-1, 1];
given an inpainting mask_image too (encode_masked_image), the masked image: the part to repaint grey."""

from pipelines.python_model import PipelineModel
from utils import specs
from utils.mask import check_mask


class TritonPythonModel(PipelineModel):
    spec = specs.PREPROCESS_IMAGE
    required = (specs.INIT_IMAGE,)

    def compute(self, request, tensors, is_cancelled):
        image = self.pipeline.check_image(request.image)
        mask = None if request.mask_image is None else check_mask(request.mask_image, image)
        return (self.pipeline.preprocess_image(image, mask),)
