"""Ensemble step of base then refiner: the second text encoder's rows -> the refiner's text
embeddings and pooled text, a row per prompt (unconditional first), as the prompt_embeds step makes
the base's (pipelines/prompts.py)."""

from pipelines.python_model import PipelineModel
from utils import specs
from utils.sdxl_ensembles import ENCODED_ROWS_2, POOLED_ROWS, REFINER_PROMPT_EMBEDS


class TritonPythonModel(PipelineModel):
    spec = REFINER_PROMPT_EMBEDS
    required = (specs.PROMPT, ENCODED_ROWS_2, POOLED_ROWS)

    def compute(self, request, tensors, is_cancelled):
        request = self.pipeline.check(request)  # the refiner's loop (python_model.py)
        embeddings = self.pipeline.prompt_embeds(request, (tensors[ENCODED_ROWS_2.name],), tensors[POOLED_ROWS.name])
        return embeddings.text, embeddings.pooled
