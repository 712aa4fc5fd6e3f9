"""Prompts as users write them: long prompts in chunks, compel's weighting, clip skip, equal to
diffusers given the prompt embeddings compel builds (in process, and served in the three ways); a
prompt past the longest served is cut and the cut reported; bad values refused by name.

The tiny model's text encoder takes 77 tokens, as SD1.5's: a window holds 75 and its BOS and EOS,
and the limit is 3 windows, 225 tokens (its tokenizer makes about a token of each character)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import report
from test_end_to_end import bls, client_side, diffusers_pipeline, ensemble, ways  # noqa: F401  (fixtures)
from tritonclient.utils import InferenceServerException

from pipelines.components import PipelineComponents
from pipelines.prompts import PromptTruncated
from pipelines.stable_diffusion import StableDiffusion
from utils import specs
from utils.networks import load_network
from utils.request import GenerationRequest, InvalidRequest

MAX_PIXEL_DIFFERENCE = 2
SCENE = "a red door by the sea, sunset, oil painting"  # 35 tokens
LONG = ", ".join([SCENE] * 5)  # 178 tokens: 3 windows
TOO_LONG = ", ".join([LONG, "golden hour, highly detailed", SCENE, SCENE])  # past 225 tokens
CASES = {  # prompt, negative prompt, options
    "long prompt (3 windows), short negative prompt": (LONG, "blurry", {}),
    "weighted up and down, long weighted negative prompt": (
        "a (red door)1.4 in a (green)0.6 wall++", f"(blurry)0.5, grainy, (dark)1.2 photo, {SCENE}, {SCENE}", {}),
    "a 200-token weighted prompt, clip skip 1": (f"(a red door)1.3 by the sea, sunset--, {LONG}", "", {"clip_skip": 1}),
    "two prompts of different lengths, no guidance": (["a cat", LONG], None, {"guidance_scale": 1.0}),
}


class ClipSkipped(torch.nn.Module):
    """A text encoder as diffusers' clip_skip makes it (the hidden state that many layers before
    the last, through the final layer norm), for compel to call as its text encoder."""

    def __init__(self, text_encoder, clip_skip: int):
        super().__init__()
        self.text_encoder, self.clip_skip = text_encoder, clip_skip

    @property
    def device(self):
        return self.text_encoder.device

    @property
    def dtype(self):
        return self.text_encoder.dtype

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        states = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        return SimpleNamespace(last_hidden_state=self.text_encoder.final_layer_norm(states[-(self.clip_skip + 1)]))


def compel_embeddings(pipeline, texts: list[str], clip_skip: int = 0) -> torch.Tensor:
    """What diffusers' documentation does for long and weighted prompts: compel, prompts not
    truncated, in fixed 75-token windows (its BRUTAL split), padded to one length."""
    from compel import Compel, SplitLongTextMode

    compel = Compel(tokenizer=pipeline.tokenizer, text_encoder=ClipSkipped(pipeline.text_encoder, clip_skip),
                    truncate_long_prompts=False, split_long_text_mode=SplitLongTextMode.BRUTAL)
    with torch.no_grad():
        return compel(texts)


def diffusers_with_compel(pipeline, prompt, negative_prompt, seed: int, steps: int, clip_skip: int = 0,
                          guidance_scale: float | None = None) -> np.ndarray:
    from utils.families import SD

    guidance_scale = SD.default_guidance_scale if guidance_scale is None else guidance_scale  # (a request's None)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt or ""] * len(prompts) if guidance_scale > 1 else []
    embeddings = compel_embeddings(pipeline, prompts + negatives, clip_skip)
    positive, negative = embeddings[:len(prompts)], embeddings[len(prompts):] if negatives else None
    output = pipeline(prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed), output_type="pil")
    return np.stack([np.asarray(image) for image in output.images])


@pytest.fixture(scope="module")
def in_process(tiny_model) -> StableDiffusion:
    networks = {name: load_network(name, tiny_model) for name in specs.NETWORKS}

    def call(network, *inputs, adapters=()):
        with torch.no_grad():
            return (networks[network.name](*inputs),)

    return StableDiffusion(PipelineComponents.from_pretrained(tiny_model), call)


def request_of(case: str, seed: int = 4) -> GenerationRequest:
    prompt, negative, options = CASES[case]
    return GenerationRequest(prompt=[prompt] if isinstance(prompt, str) else prompt,
                             negative_prompt=None if negative is None else [negative], seed=seed,
                             num_inference_steps=6, **options)


@pytest.mark.parametrize("case", CASES)
def test_prompts_in_process_equal_diffusers_with_compel(case, in_process, diffusers_pipeline):  # noqa: F811
    request = request_of(case)
    generated = in_process.generate(request)
    ours = generated.images.numpy()
    assert generated.truncated == [""] * len(generated.truncated)  # each within the limit
    expected = diffusers_with_compel(diffusers_pipeline, request.prompt, CASES[case][1], request.seed, 6,
                                     request.clip_skip or 0, request.guidance_scale)
    difference = int(np.abs(ours.astype(int) - expected.astype(int)).max())
    report(f"prompts in process vs diffusers + compel, {case}: max pixel difference {difference} "
           f"(allowed {MAX_PIXEL_DIFFERENCE})")
    assert ours.shape == expected.shape and difference <= MAX_PIXEL_DIFFERENCE


def test_a_long_prompt_is_several_chunks_and_one_past_the_limit_is_cut_and_reported(in_process,
                                                                                    diffusers_pipeline):  # noqa: F811
    dims = in_process.components.dims
    request = GenerationRequest(prompt=[LONG], guidance_scale=1.0)
    assert in_process.encode_prompt(request).text.shape == (1, 3 * dims.text_length, dims.text_hidden)
    too_long = GenerationRequest(prompt=[TOO_LONG], guidance_scale=1.0)
    rows = in_process.tokenize(too_long)
    cut = rows.truncated[0]
    assert cut and TOO_LONG.endswith(" " + cut) and len(cut) < len(TOO_LONG) - len(LONG)  # its end, word by word
    # The windows are encoded apart, and the prompt cut between words: the cut prompt's first
    # windows are the whole one's, its last one holds the words that fit.
    kept = in_process.encode_prompt(too_long, rows).text
    whole = compel_embeddings(diffusers_pipeline, list(too_long.prompt))
    assert whole.shape[1] > kept.shape[1] == 3 * dims.text_length
    assert torch.allclose(kept[:, :2 * dims.text_length], whole[:, :2 * dims.text_length], atol=1e-5)
    assert in_process.tokenize(GenerationRequest(prompt=[LONG])).truncated == ["", ""]  # nothing cut


@pytest.mark.parametrize("clip_skip, message", [
    (-1, r"clip_skip=-1 is not allowed: use an integer in \[0, 1\]"),
    (2, r"clip_skip=2 is not allowed: use an integer in \[0, 1\] \(the text encoder's 2 layers"),
    (1.5, r"clip_skip=1.5 is not allowed"),
])
def test_a_bad_clip_skip_is_refused_by_name(clip_skip, message, in_process):
    with pytest.raises(InvalidRequest, match=message):
        in_process.check(GenerationRequest(prompt=["a"], clip_skip=clip_skip))


def test_a_conjunction_past_the_limit_is_refused_not_cut(in_process):
    with pytest.raises(InvalidRequest, match=r"in .and\(\) or .blend\(\) parts: at most 225 \(3 chunks of 75\)"):
        in_process.tokenize(GenerationRequest(prompt=[f'("{LONG}", "{LONG}").and()'], guidance_scale=1.0))


@pytest.mark.server
@pytest.mark.parametrize("kind", ["client-side", "BLS", "ensemble"])
def test_served_prompts_equal_diffusers_with_compel(kind, ways, diffusers_pipeline):  # noqa: F811
    for case in ("weighted up and down, long weighted negative prompt", "a 200-token weighted prompt, clip skip 1"):
        request = request_of(case, seed=11)
        prompt, negative, options = CASES[case]
        served = ways[kind](prompt=prompt, negative_prompt=negative, seed=11, num_inference_steps=6, **options)
        expected = diffusers_with_compel(diffusers_pipeline, request.prompt, negative, 11, 6, request.clip_skip or 0)
        difference = int(np.abs(served.astype(int) - expected.astype(int)).max())
        report(f"{kind:<12} prompts vs diffusers + compel, {case}: max pixel difference {difference} "
               f"(allowed {MAX_PIXEL_DIFFERENCE})")
        assert served.shape == expected.shape and difference <= MAX_PIXEL_DIFFERENCE


@pytest.mark.server
def test_served_pipelines_report_what_they_cut(bls, ensemble, client_side):  # noqa: F811
    too_long = TOO_LONG
    for pipeline in (bls, ensemble, client_side):
        with pytest.warns(PromptTruncated, match="painting"):
            pipeline(prompt=too_long, seed=1, num_inference_steps=2, **({"progress": False} if pipeline is client_side
                                                                        else {}))
    for spec in (specs.TEXT_TO_IMAGE, specs.ENSEMBLES["ensemble_text_to_image"]):  # the tensor itself, as sent
        arrays = {specs.PROMPT.name: np.array([too_long.encode()], dtype=np.object_),
                  specs.NUM_INFERENCE_STEPS.name: np.array([2], dtype=np.int32)}
        result = bls.client.infer(spec.name, _inputs(arrays))
        negative, positive = (text.decode() for text in result.as_numpy(specs.TRUNCATED_TEXT.name))
        assert negative == "" and "painting" in positive


@pytest.mark.server
@pytest.mark.parametrize("model", [specs.TEXT_TO_IMAGE.name, "ensemble_text_to_image"])
def test_a_bad_clip_skip_is_refused_by_the_server_which_keeps_serving(model, bls):  # noqa: F811
    arrays = {specs.PROMPT.name: np.array([b"a red door"], dtype=np.object_),
              specs.CLIP_SKIP.name: np.array([7], dtype=np.int32),
              specs.NUM_INFERENCE_STEPS.name: np.array([2], dtype=np.int32)}
    with pytest.raises(InferenceServerException, match=r"clip_skip=7 is not allowed: use an integer in \[0, 1\]"):
        bls.client.infer(model, _inputs(arrays))
    assert bls(prompt="a red door", seed=1, num_inference_steps=2, clip_skip=1).shape[0] == 1


def _inputs(arrays):
    from utils.grpc_client import infer_inputs

    return infer_inputs(arrays)
