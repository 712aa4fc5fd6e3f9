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
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from utils import specs
from utils.families import Family
from utils.request import GenerationRequest, InvalidRequest


@dataclass(frozen=True)
class EncoderRows:
    """What one text encoder is asked to encode for one request, a row per chunk."""

    input_ids: torch.Tensor  # INT32 [rows, text_length]
    attention_mask: torch.Tensor  # INT32 [rows, text_length]: 0 where a down-weighted part is masked out
    skipped_layers: torch.Tensor  # INT32 [rows]: the request's clip_skip


@dataclass(frozen=True)
class PromptRows:
    """A request's rows for each text encoder of its family, and the text cut from each prompt."""

    encoders: tuple[EncoderRows, ...]
    truncated: list[str]  # in texts() order ("" where none); SDXL's prompt_2 texts after, where they differ


@dataclass(frozen=True)
class PromptEmbeddings:
    """What the UNet is conditioned on, a row per text (texts() order): the text embeddings, and
    SDXL's pooled text (None for SD1.x)."""

    text: torch.Tensor  # [texts, prompt_length, unet_text_hidden]
    pooled: torch.Tensor | None = None  # [texts, pooled_dim]

    def to(self, device) -> PromptEmbeddings:
        return PromptEmbeddings(self.text.to(device), None if self.pooled is None else self.pooled.to(device))


@dataclass(frozen=True)
class TextEncoding:
    """How a checkpoint's prompts are encoded: its tokenizers, one per text encoder of its family
    (utils/families.py), and whether an absent negative prompt is zeros (SDXL's
    force_zeros_for_empty_prompt) rather than the empty prompt's embeddings."""

    tokenizers: tuple
    family: Family
    dims: specs.ModelDims
    zero_negative: bool = False

    def texts(self, request: GenerationRequest, encoder: int = 0) -> list[str]:
        """The texts the ``encoder``-th text encoder encodes: texts(), without the unconditional
        ones where they are zeros, and SDXL's prompt_2 texts for its second encoder."""
        second = encoder == 1
        negatives = [] if self.zeros(request) else None
        return texts(request, second=second, negatives=negatives)

    def zeros(self, request: GenerationRequest) -> bool:
        return self.zero_negative and request.do_classifier_free_guidance and not request.negative_prompt


def texts(request: GenerationRequest, second: bool = False, negatives: list[str] | None = None) -> list[str]:
    """The texts a request encodes, unconditional first when guidance is on (the specs' CFG order);
    ``second``: SDXL's second text encoder's (prompt_2 and negative_prompt_2, where given)."""
    if negatives is None:
        negatives = request.negative_prompts(second) if request.do_classifier_free_guidance else []
    return negatives + request.prompts(second)


def check_clip_skip(request: GenerationRequest, dims: specs.ModelDims, family: Family) -> None:
    value = request.clip_skip
    if value is None:
        return
    layers = dims.text_layers - family.hidden_state_offset  # SDXL counts back from the layer before the last
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < layers:
        raise InvalidRequest(f"clip_skip={value!r} is not allowed: use an integer in [0, {layers - 1}] (the "
                             f"text encoder's {dims.text_layers} layers; 0: diffusers' default; 1: the "
                             f"one before, A1111's 'clip skip 2').")


def plan(encoding: TextEncoding, request: GenerationRequest) -> PromptRows:
    """The rows to encode for this request's prompts, each text encoder's, and the text cut from each."""
    passes = _encode(encoding, request)
    encoders, truncated = [], []
    for index, (tokenizer, network, (stand_in, _, cut)) in enumerate(zip(encoding.tokenizers,
                                                                         encoding.family.text_encoders, passes)):
        dims, prompts = _encoder_dims(encoding, network), encoding.texts(request, index)
        if index == 0 or prompts != encoding.texts(request, 0):
            truncated += cut
        if network is encoding.family.pooled:  # SDXL's pooled text: each text's first 77 tokens, as diffusers'
            ids = tokenizer(prompts, padding="max_length", max_length=dims.text_length, truncation=True,
                            return_tensors="pt").input_ids
            stand_in.asked.append((ids, torch.ones_like(ids)))
        if len(stand_in.asked) > network.profile.max:
            raise InvalidRequest(
                f"the prompts need {len(stand_in.asked)} {network.name} rows (a row per chunk of {dims.text_length - 2} "
                f"tokens, and one more per chunk for each down-weighted part): at most {network.profile.max} "
                f"per request; send fewer prompts, shorter ones, or fewer down-weighted parts.")
        ids = torch.cat([ids for ids, _ in stand_in.asked]).to(torch.int32)
        mask = torch.cat([mask for _, mask in stand_in.asked]).to(torch.int32)
        encoders.append(EncoderRows(ids, mask, torch.full((ids.shape[0],), request.clip_skip or 0, dtype=torch.int32)))
    return PromptRows(tuple(encoders), truncated)


def assemble(encoding: TextEncoding, request: GenerationRequest, encoded: tuple[torch.Tensor, ...],
             pooled: torch.Tensor | None = None) -> PromptEmbeddings:
    """The UNet's conditioning from the rows ``plan`` asked for, encoded in the same order: each text
    encoder's hidden states (``encoded``), and the pooled text encoder's pooled rows (``pooled``)."""
    answers, pooled_texts = [], None
    for index, (network, rows) in enumerate(zip(encoding.family.text_encoders, encoded)):
        if network is encoding.family.pooled:  # its last rows, one per text: the pooled text's
            count = len(encoding.texts(request, index))
            if pooled is None or pooled.shape[0] != rows.shape[0] or rows.shape[0] < count:
                raise InvalidRequest(f"{network.name}'s text_embeds are required, a row per row it encoded.")
            rows, pooled_texts = rows[:-count], pooled[-count:].float().cpu()
        answers.append(rows)
    per_encoder = []
    for network, rows, (stand_in, embeddings, _) in zip(encoding.family.text_encoders, answers,
                                                        _encode(encoding, request, answers)):
        per_encoder.append(embeddings)
        if stand_in.answered != rows.shape[0]:
            raise InvalidRequest(f"{network.name}'s last_hidden_state has {rows.shape[0]} rows: these prompts need "
                                 f"{stand_in.answered} (the tokenizer step's rows, in its order).")
    text = torch.cat(per_encoder, dim=-1)
    if encoding.zeros(request):  # SDXL without a negative prompt: zeros, as diffusers' force_zeros_for_empty_prompt
        text = torch.cat([torch.zeros_like(text), text])
        pooled_texts = torch.cat([torch.zeros_like(pooled_texts), pooled_texts])
    dtype = encoded[0].dtype
    return PromptEmbeddings(text.to(dtype), None if pooled_texts is None else pooled_texts.to(dtype))


def _encode(encoding: TextEncoding, request: GenerationRequest, answers: list[torch.Tensor] | None = None) -> list:
    """compel on each text encoder's stand-in (recording the rows it asks for, or answering them
    from ``answers``): per text encoder, (stand-in, embeddings padded to the longest of them all,
    the text cut from each prompt)."""
    runs = []
    for index, (tokenizer, network) in enumerate(zip(encoding.tokenizers, encoding.family.text_encoders)):
        dims = _encoder_dims(encoding, network)
        stand_in = _TextEncoderStandIn(dims.text_hidden, answers=None if answers is None else answers[index])
        compel = _compel(tokenizer, stand_in)
        runs.append((stand_in, compel, *_conditionings(compel, tokenizer, encoding.texts(request, index), dims)))
    length = max(c.shape[1] for _, _, conditionings, _ in runs for c in conditionings)
    return [(stand_in, _padded(compel, conditionings, length), cut) for stand_in, compel, conditionings, cut in runs]


def _encoder_dims(encoding: TextEncoding, network: specs.NetworkSpec) -> specs.ModelDims:
    """The dims as compel sees one text encoder: its own features."""
    hidden = encoding.dims.text_hidden_2 if network.name != specs.TEXT_ENCODER.name else encoding.dims.text_hidden
    return replace(encoding.dims, text_hidden=hidden)


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


def _compel(tokenizer, stand_in: _TextEncoderStandIn):
    from compel import Compel, SplitLongTextMode

    return Compel(tokenizer=tokenizer, text_encoder=stand_in, truncate_long_prompts=False,
                  split_long_text_mode=SplitLongTextMode.BRUTAL, device="cpu")


def _conditionings(compel, tokenizer, prompts: list[str], dims: specs.ModelDims) -> tuple[list[torch.Tensor], list[str]]:
    """compel's embeddings of each of ``prompts``, cut to MAX_PROMPT_CHUNKS, and the text cut from each."""
    conditionings, truncated = [], []
    for index, text in enumerate(prompts):
        conjunction, cut = _fitted(compel.parse_prompt_string(text), tokenizer, dims, index)
        conditioning = compel.build_conditioning_tensor_for_conjunction(conjunction)[0]
        # (a cut fragment whose text tokenizes longer again: its last window dropped, as the windows are independent)
        conditionings.append(conditioning[:, :specs.MAX_PROMPT_CHUNKS * dims.text_length])
        truncated.append(cut)
    return conditionings, truncated


def _padded(compel, conditionings: list[torch.Tensor], length: int) -> torch.Tensor:
    """The embeddings padded to ``length`` tokens with the empty prompt's chunk, as compel pads them
    (``length``: the longest of the request's, over every text encoder)."""
    longest = torch.zeros(1, length, conditionings[0].shape[-1])
    return torch.cat(compel.pad_conditioning_tensors_to_same_length([*conditionings, longest])[:-1])


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
