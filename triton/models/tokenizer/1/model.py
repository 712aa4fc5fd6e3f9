"""Ensemble step: prompts -> token ids, unconditional rows first when guidance is on (the specs'
classifier-free-guidance order), ready for the text encoder."""

from pipelines.python_model import PipelineModel
from utils import specs


class TritonPythonModel(PipelineModel):
    spec = specs.TOKENIZER
    required = (specs.PROMPT,)

    def compute(self, request, tensors, is_cancelled):
        return (self.pipeline.tokenize(self.pipeline.check(request)),)
