"""Ensemble step: the text encoder's rows -> the UNet's text embeddings, a row per prompt
(unconditional first): compel's weights applied, a long prompt's chunks joined, the prompts padded
to one length (pipelines/prompts.py). It reads the prompts again to know which row is which, as
the tokenizer step planned them."""

from pipelines.python_model import PipelineModel
from utils import specs
from utils.sdxl_ensembles import ENCODED_ROWS_2, POOLED_ROWS  # SDXL's second text encoder's


class TritonPythonModel(PipelineModel):
    spec = specs.PROMPT_EMBEDS
    required = (specs.PROMPT, specs.ENCODED_ROWS)

    def compute(self, request, tensors, is_cancelled):
        encoded = tuple(tensors[t.name] for t in (specs.ENCODED_ROWS, ENCODED_ROWS_2) if t.name in tensors)
        embeddings = self.pipeline.prompt_embeds(self.pipeline.check(request), encoded, tensors.get(POOLED_ROWS.name))
        return (embeddings.text,) if embeddings.pooled is None else (embeddings.text, embeddings.pooled)
