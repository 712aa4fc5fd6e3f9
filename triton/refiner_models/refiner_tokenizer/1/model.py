"""Ensemble step of base then refiner: prompts -> the rows of the refiner's one text encoder (the
second, which it shares with the base), with the refiner's tokenizer, planned as the tokenizer step
plans them (pipelines/prompts.py). As diffusers' refiner, it encodes the prompts, not prompt_2."""

from pipelines.python_model import PipelineModel
from utils import specs
from utils.families import TEXT_ENCODER_2
from utils.sdxl_ensembles import REFINER_TOKENIZER


class TritonPythonModel(PipelineModel):
    spec = REFINER_TOKENIZER
    required = (specs.PROMPT,)

    def compute(self, request, tensors, is_cancelled):
        rows = self.pipeline.tokenize(self.pipeline.check(request))  # the refiner's loop (python_model.py)
        (encoder,) = rows.encoders
        encoded = (encoder.input_ids, encoder.attention_mask, encoder.skipped_layers)
        return (*(tensor.to_wire(value) for tensor, value in zip(TEXT_ENCODER_2.inputs, encoded)), rows.truncated)
