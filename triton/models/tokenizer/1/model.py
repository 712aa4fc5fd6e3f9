"""Ensemble step: prompts -> the rows the text encoder encodes, unconditional prompts first when
guidance is on (the specs' classifier-free-guidance order): a row per 77-token chunk of each prompt,
and for a weighted prompt compel's masked variants (pipelines/prompts.py); with the text cut from
each prompt past the longest served. An SDXL repository's plans the second text encoder's rows too
(utils/sdxl_ensembles.py)."""

from pipelines.python_model import PipelineModel
from utils import specs


class TritonPythonModel(PipelineModel):
    spec = specs.TOKENIZER
    required = (specs.PROMPT,)

    def compute(self, request, tensors, is_cancelled):
        rows = self.pipeline.tokenize(self.pipeline.check(request))
        encoded = [tensor.to_wire(value) for encoder in rows.encoders  # each text encoder's (SDXL's second's after)
                   for tensor, value in zip(specs.TEXT_ENCODER.inputs,
                                            (encoder.input_ids, encoder.attention_mask, encoder.skipped_layers))]
        return (*encoded, rows.truncated)
