"""Prompts as users write them: longer than the text encoder's 77 tokens, weighted, with clip skip.

compel, the library diffusers' documentation uses for prompt weighting, parses the syntax
(``(red door)1.3``, ``red+``, ``red--``, ``("a", "b").blend(0.7, 0.3)``) and computes the embeddings.
It calls a text encoder once per chunk of each prompt; here the text encoder is served, so compel
runs twice around one batched call of it:

1. plan (the tokenizer step): compel runs against a stand-in text encoder that records each row it
   asks for (a chunk of 77 token ids, and, for a down-weighted part, the same chunk with that part
   masked out of the attention) and answers zeros. What compel asks for depends on the tokens and the
   weights only, never on the values it gets back.
2. the served text encoder encodes those rows, in one call (pipelines/stable_diffusion.py).
3. assemble (the prompt_embeds step): compel runs again, the stand-in answering each call with the
   row encoded for it, in the same order. The arithmetic is compel's own: a weight scales a token's
   embedding away from the empty prompt's, a weight below 1 blends towards the prompt with that part
   masked out, chunks are joined, and the prompts of a request are padded to one length with the
   empty prompt's chunk (so the UNet sees positive and negative rows of the same length).

Long prompts are split in fixed windows of 75 tokens, each between its BOS and EOS (compel's BRUTAL
mode, the windows A1111 uses before its comma back-tracking): the chunking is then exact in tokens,
so the limit (MAX_PROMPT_CHUNKS windows) is too. What a prompt has beyond it is cut, and the text cut
is reported in the response. clip_skip is the served text encoder's own input (utils/specs.py).
"""

from __future__ import annotations

import numbers
import re
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from utils import specs
from utils.request import GenerationRequest, InvalidRequest


@dataclass(frozen=True)
class EncoderRows:
    """What the text encoder is asked to encode for one request, a row per chunk, and what was cut."""

    input_ids: torch.Tensor  # INT32 [rows, text_length]
    attention_mask: torch.Tensor  # INT32 [rows, text_length]: 0 where a down-weighted part is masked out
    skipped_layers: torch.Tensor  # INT32 [rows]: the request's clip_skip
    truncated: list[str]  # the text cut from each prompt, in texts() order ("" where none)


def texts(request: GenerationRequest) -> list[str]:
    """The texts a request encodes, unconditional first when guidance is on (the specs' CFG order)."""
    return (request.negative_prompts() if request.do_classifier_free_guidance else []) + list(request.prompt)


def check_clip_skip(request: GenerationRequest, dims: specs.ModelDims) -> None:
    value = request.clip_skip
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < dims.text_layers:
        raise InvalidRequest(f"clip_skip={value!r} is not allowed: use an integer in [0, {dims.text_layers - 1}] (the "
                             f"text encoder's {dims.text_layers} layers; 0: the last, as diffusers' default; 1: the "
                             f"one before, A1111's 'clip skip 2').")


def plan(tokenizer, request: GenerationRequest, dims: specs.ModelDims) -> EncoderRows:
    """The rows to encode for this request's prompts, and the text cut from each."""
    stand_in = _TextEncoderStandIn(dims.text_hidden)
    truncated = _embeddings(tokenizer, stand_in, texts(request), dims)[1]
    if len(stand_in.asked) > specs.TEXT_ENCODER.profile.max:
        raise InvalidRequest(
            f"the prompts need {len(stand_in.asked)} text encoder rows (a row per chunk of {dims.text_length - 2} "
            f"tokens, and one more per chunk for each down-weighted part): at most {specs.TEXT_ENCODER.profile.max} "
            f"per request; send fewer prompts, shorter ones, or fewer down-weighted parts.")
    ids = torch.cat([ids for ids, _ in stand_in.asked]).to(torch.int32)
    mask = torch.cat([mask for _, mask in stand_in.asked]).to(torch.int32)
    return EncoderRows(ids, mask, torch.full((ids.shape[0],), request.clip_skip or 0, dtype=torch.int32), truncated)


def assemble(tokenizer, request: GenerationRequest, dims: specs.ModelDims, encoded: torch.Tensor) -> torch.Tensor:
    """The UNet's text embeddings [texts, prompt_length, text_hidden] from the rows ``plan`` asked
    for, encoded in the same order."""
    stand_in = _TextEncoderStandIn(dims.text_hidden, answers=encoded)
    embeddings = _embeddings(tokenizer, stand_in, texts(request), dims)[0]
    if stand_in.answered != encoded.shape[0]:
        raise InvalidRequest(f"last_hidden_state has {encoded.shape[0]} rows: these prompts need "
                             f"{stand_in.answered} (the tokenizer step's rows, in its order).")
    return embeddings.to(encoded.dtype)


class _TextEncoderStandIn:
    """What compel calls as its text encoder: records the rows it asks for, or answers each with
    the row encoded for it."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, hidden: int, answers: torch.Tensor | None = None):
        self.hidden, self.answers = hidden, answers
        self.asked: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.answered = 0

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.asked.append((input_ids.cpu(), mask.cpu()))
        if self.answers is None:
            state = torch.zeros(*input_ids.shape, self.hidden)
        elif self.answered + input_ids.shape[0] > self.answers.shape[0]:
            raise InvalidRequest(f"last_hidden_state has {self.answers.shape[0]} rows: these prompts need more "
                                 f"(the tokenizer step's rows, in its order).")
        else:
            state = self.answers[self.answered:self.answered + input_ids.shape[0]].float().cpu()
        self.answered += input_ids.shape[0]
        return SimpleNamespace(last_hidden_state=state)


def _embeddings(tokenizer, stand_in: _TextEncoderStandIn, prompts: list[str],
                dims: specs.ModelDims) -> tuple[torch.Tensor, list[str]]:
    """compel's embeddings of ``prompts``, each cut to MAX_PROMPT_CHUNKS, padded to one length."""
    from compel import Compel, SplitLongTextMode

    compel = Compel(tokenizer=tokenizer, text_encoder=stand_in, truncate_long_prompts=False,
                    split_long_text_mode=SplitLongTextMode.BRUTAL, device="cpu")
    conditionings, truncated = [], []
    for index, text in enumerate(prompts):
        conjunction, cut = _fitted(compel.parse_prompt_string(text), tokenizer, dims, index)
        conditioning = compel.build_conditioning_tensor_for_conjunction(conjunction)[0]
        # (a cut fragment whose text tokenizes longer again: its last window dropped, as the windows are independent)
        conditionings.append(conditioning[:, :specs.MAX_PROMPT_CHUNKS * dims.text_length])
        truncated.append(cut)
    return torch.cat(compel.pad_conditioning_tensors_to_same_length(conditionings)), truncated


def _fitted(conjunction, tokenizer, dims: specs.ModelDims, index: int):
    """The prompt cut to the tokens of MAX_PROMPT_CHUNKS windows, and the text cut ("" if none).
    Only a prompt of one part can be cut (a ``.and()`` or a ``.blend()`` cannot: which part would lose
    what?); such a prompt past the limit is refused."""
    from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

    window = dims.text_length - 2  # each chunk's own BOS and EOS
    budget = specs.MAX_PROMPT_CHUNKS * window
    parts = [_token_ids(tokenizer, part) for prompt in conjunction.prompts for part in _parts(prompt)]
    tokens = sum(len(ids) for ids in parts)
    if tokens <= budget:
        return conjunction, ""
    prompt = conjunction.prompts[0] if len(conjunction.prompts) == 1 else None
    if not isinstance(prompt, FlattenedPrompt) or not all(isinstance(f, Fragment) for f in prompt.children):
        raise InvalidRequest(f"prompt {index} (in the order negative prompts, then prompts) has about {tokens} tokens "
                             f"in .and() or .blend() parts: at most {budget} ({specs.MAX_PROMPT_CHUNKS} chunks of "
                             f"{window}) are served; shorten it.")
    kept, cut = [], []
    for fragment, ids in zip(prompt.children, parts):
        if budget >= len(ids):
            kept.append(fragment)
        else:  # the longest start of its text, cut between words, that fits what is left
            end = _fitting_prefix(tokenizer, fragment.text, max(budget, 0))
            if end:
                kept.append(Fragment(fragment.text[:end].rstrip(), fragment.weight))
            cut.append(fragment.text[end:].strip())
        budget -= len(ids)
    return Conjunction([FlattenedPrompt(kept)]), " ".join(text for text in cut if text)


def _fitting_prefix(tokenizer, text: str, budget: int) -> int:
    """Where to cut ``text`` (a word boundary, so that the words kept tokenize as in the whole
    text) for the most of it in ``budget`` tokens."""
    ends = [match.start() for match in re.finditer(r"\s", text)] + [len(text)]
    low, high = 0, len(ends)  # ends[:low] fit; found by halving, a tokenization each
    while low < high:
        middle = (low + high) // 2
        if len(_token_ids(tokenizer, text[:ends[middle]])) <= budget:
            low = middle + 1
        else:
            high = middle
    return ends[low - 1] if low else 0


def _parts(prompt) -> list:
    """The fragments of a flattened prompt, or of each prompt a blend mixes."""
    children = getattr(prompt, "children", None)
    if children is not None:
        return list(children)
    return [part for inner in getattr(prompt, "prompts", ()) for part in _parts(inner)]


def _token_ids(tokenizer, fragment) -> list[int]:
    text = fragment if isinstance(fragment, str) else getattr(fragment, "text", None)
    if text is None:  # a .swap()'s parts: counted as their text
        text = " ".join(getattr(part, "text", "") for part in getattr(fragment, "original", ()))
    return tokenizer(text, add_special_tokens=False, truncation=False).input_ids


class PromptTruncated(UserWarning):
    """A prompt was longer than the longest served: its end was cut (the response says what)."""


def warn_if_truncated(truncated: list[str]) -> None:
    """Tell a client's caller what the server cut from its prompts, as diffusers logs what it cuts."""
    cut = [text for text in truncated if text]
    if cut:
        warnings.warn(f"prompts longer than {specs.MAX_PROMPT_CHUNKS} chunks of the text encoder's tokens were cut; "
                      f"the text cut: {cut}", PromptTruncated, stacklevel=3)
