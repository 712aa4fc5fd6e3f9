"""Ensemble step: prompts -> token ids, unconditional rows first when guidance is on (the specs'
classifier-free-guidance order), ready for the text encoder."""

from utils import specs
from utils.python_backend.pipeline_model import PipelineModel


class TritonPythonModel(PipelineModel):
    spec = specs.TOKENIZER
    required = (specs.PROMPT,)

    def run(self, request, tensors, is_cancelled):
        return (self.pipeline.tokenize(self.pipeline.check(request)),)
