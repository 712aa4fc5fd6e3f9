"""Ensemble step: the text encoder's rows -> the UNet's text embeddings, a row per prompt
(unconditional first): compel's weights applied, a long prompt's chunks joined, the prompts padded
to one length (pipelines/prompts.py). It reads the prompts again to know which row is which, as
the tokenizer step planned them."""

from pipelines.python_model import PipelineModel
from utils import specs


class TritonPythonModel(PipelineModel):
    spec = specs.PROMPT_EMBEDS
    required = (specs.PROMPT, specs.ENCODED_ROWS)

    def compute(self, request, tensors, is_cancelled):
        return (self.pipeline.prompt_embeds(self.pipeline.check(request), (tensors[specs.ENCODED_ROWS.name],)).text,)
