"""What the loop needs from a checkpoint besides its networks: the tokenizer, the scheduler
config and the sizes, read from the diffusers folder (no weights)."""

from __future__ import annotations

import copy
import functools
import inspect
import json
import threading
from pathlib import Path

from pipelines.prompts import TextEncoding
from utils import specs
from utils.families import family_of

_LAZY_IMPORTS = threading.Lock()


class PipelineComponents:
    """What the loop needs from a checkpoint besides the networks: no weights. The tokenizer and
    the scheduler load when first used, so that a model that needs neither (an ensemble's image
    steps) starts without importing transformers or diffusers."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.scheduler_config = json.loads((self.model_dir / "scheduler" / "scheduler_config.json").read_text())
        vae_config = json.loads((self.model_dir / "vae" / "config.json").read_text())
        self.vae_scaling_factor = vae_config.get("scaling_factor", 0.18215)
        self.dims = specs.ModelDims.from_pretrained(self.model_dir)
        self.family = family_of(self.dims)  # SD1.x or SDXL (or SDXL's refiner): its networks
        index = json.loads((self.model_dir / "model_index.json").read_text())
        # SDXL: an absent negative prompt conditions on zeros, not on the empty prompt's embeddings
        self.zero_negative = bool(index.get("force_zeros_for_empty_prompt", False))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> PipelineComponents:
        return cls(model_dir)

    @classmethod
    def where(cls, model_dir: Path) -> PipelineComponents | None:
        """The components of a folder that may be absent (SDXL's refiner, where none is served)."""
        return cls(model_dir) if Path(model_dir).is_dir() else None

    @functools.cached_property
    def tokenizers(self) -> tuple:
        """One per text encoder of the family, in its order (SDXL's second: tokenizer_2)."""
        with _LAZY_IMPORTS:  # transformers' lazy module fails two threads importing from it at once
            from transformers import CLIPTokenizer
        folders = [network.name.replace("text_encoder", "tokenizer") for network in self.family.text_encoders]
        return tuple(CLIPTokenizer.from_pretrained(self.model_dir / folder) for folder in folders)

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def text_encoding(self) -> TextEncoding:
        """How this checkpoint's prompts are encoded (pipelines/prompts.py)."""
        return TextEncoding(self.tokenizers, self.family, self.dims, self.zero_negative)

    @property
    def scheduler(self):
        """The checkpoint's own scheduler, never used itself: each request gets a copy (new_scheduler)."""
        return self._scheduler(self.scheduler_config["_class_name"])

    @functools.lru_cache(maxsize=None)
    def _scheduler(self, class_name: str):
        """A scheduler of this class built from the checkpoint's scheduler config, once per class."""
        with _LAZY_IMPORTS:
            import diffusers
        scheduler_class = getattr(diffusers, class_name)
        # The constructor, not from_config: from_config imports every compatible scheduler class
        # on each call, and some import scipy, which fails in the pipeline model's numpy 1
        # environment (utils/repository/environments.py). Config keys the class does not take (another
        # scheduler's, like clip_sample for PNDM) are left out, as from_config leaves them.
        accepted = inspect.signature(scheduler_class.__init__).parameters
        config = {k: v for k, v in self.scheduler_config.items() if k in accepted}
        if "clip_sample" in accepted:  # as diffusers' StableDiffusionPipeline sets it: SD's latents are not clipped
            config["clip_sample"] = False
        return scheduler_class(**config)

    def load(self) -> PipelineComponents:
        """Load the tokenizer and the scheduler now, for a pipeline that will need both, rather
        than in its first request."""
        self.tokenizer, self.scheduler  # noqa: B018  (cached on first access)
        return self

    def new_scheduler(self, class_name: str | None = None):
        """A scheduler of a request's own (PNDM keeps state between steps): the checkpoint's, or
        another one of the allowed classes (utils/request.py checks the name first)."""
        return copy.deepcopy(self._scheduler(class_name or self.scheduler_config["_class_name"]))
