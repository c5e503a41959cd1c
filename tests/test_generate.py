"""Our model and frame stepper against transformers' CsmForConditionalGeneration on the same random weights."""

from __future__ import annotations

import pytest
import torch

from csmcli import checkpoint
from csmcli.codec import MimiCodec
from csmcli.engine import Engine
from csmcli.errors import CsmError
from csmcli.prompt import BEGIN_OF_TEXT, END_OF_TEXT, Segment, build_prompt, frame_budget
from csmcli.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
TEXT = "Hello there, how are you?"


@pytest.fixture(scope="module")
def ours(hf_checkpoint):
    return checkpoint.load(str(hf_checkpoint))


def hf_greedy(hf_model, input_ids, frames, **audio):
    # An explicit mask, as CsmProcessor returns: otherwise generate() infers one from pad_token_id (128002), which
    # is also the <|AUDIO|> placeholder, and would mask out every context audio frame.
    out = hf_model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=frames, do_sample=False,
        depth_decoder_do_sample=False, **audio,
    )
    return out[0]  # [frames, 32]


def our_frames(ck, prompt, frames, params=GREEDY, chunk=3):
    chunks = list(Engine(ck.model).stream(prompt, params, frames, chunk, chunk))
    return torch.cat([c.codes for c in chunks]), chunks


def text_ids(tokenizer, speaker, text):
    return [BEGIN_OF_TEXT, *tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False), END_OF_TEXT]


def test_text_that_spells_a_control_token_stays_text(ours):
    """Words like "<|end_of_text|>" in what to say are text, not the control token (which would end the text
    segment early and put another begin-of-text in it)."""
    prompt = build_prompt(ours.tokenizer, [], 0, "Type <|end_of_text|> then <|begin_of_text|> here.", None)
    ids = prompt.tokens[:, -1].tolist()
    assert ids[0] == BEGIN_OF_TEXT and ids[-1] == END_OF_TEXT
    assert BEGIN_OF_TEXT not in ids[1:] and END_OF_TEXT not in ids[:-1]
    plain = build_prompt(ours.tokenizer, [], 0, "Type them here.", None).tokens[:, -1].tolist()
    assert plain == text_ids(ours.tokenizer, 0, "Type them here.")  # ordinary text: the reference's ids


def test_backbone_and_decoder_logits_match_transformers(ours, hf_model):
    ids = torch.tensor([text_ids(ours.tokenizer, 0, TEXT)])
    with torch.no_grad():
        ref = hf_model(input_ids=ids, output_hidden_states=True)
    prompt = build_prompt(ours.tokenizer, [], 0, TEXT, None)
    model = ours.model
    caches = model.new_caches(1)
    with torch.inference_mode():
        embeds = model.embed_rows(prompt.tokens[None], prompt.mask[None])
        hidden = model.backbone(embeds, torch.arange(prompt.rows)[None], caches.backbone)  # per-row positions
        torch.testing.assert_close(model.codebook0_head(hidden), ref.logits, rtol=1e-5, atol=1e-5)
        # depth decoder on [h, c0, c1]: logits for codebooks 1 and 2
        codes = torch.tensor([[7, 11]])
        ref_dd = hf_model.depth_decoder(
            input_ids=torch.tensor([[0, 7, 11]]), backbone_last_hidden_state=hidden[:, -1]
        ).logits
        x = torch.stack([hidden[:, -1], model.audio_embeddings(codes[:, 0]),
                         model.audio_embeddings(codes[:, 1] + model.cfg.audio_vocab_size)], dim=1)
        h = model.decoder(model.projection(x), 0, caches.decoder)  # the static-slice path, 3-row causal mask
        ours_dd = torch.stack([h[:, i + 1] @ model.audio_head[i] for i in range(2)], dim=1)
        torch.testing.assert_close(ours_dd, ref_dd, rtol=1e-5, atol=1e-5)


def test_greedy_codes_equal_transformers(ours, hf_model):
    frames = 20
    ids = torch.tensor([text_ids(ours.tokenizer, 1, TEXT)])
    expected = hf_greedy(hf_model, ids, frames)
    got, chunks = our_frames(ours, build_prompt(ours.tokenizer, [], 1, TEXT, None), frames)
    assert got.shape == (frames, 32)
    assert torch.equal(got, expected)
    assert chunks[-1].stop == "max_frames" and [len(c.codes) for c in chunks] == [3] * 6 + [2]


def test_greedy_codes_with_context_audio_equal_transformers(ours, hf_model):
    frames = 20
    torch.manual_seed(1)
    audio = 0.1 * torch.randn(24000 * 6 // 10)  # 0.6 s: a 7-frame context turn
    with torch.no_grad():
        context_codes = hf_model.codec_model.encode(audio[None, None]).audio_codes[0]  # [32, F]
    n = context_codes.shape[1]
    context_ids = text_ids(ours.tokenizer, 0, "Fine, thanks.") + [128002] * n + [128003]
    ids = torch.tensor([context_ids + text_ids(ours.tokenizer, 1, TEXT)])
    expected = hf_greedy(hf_model, ids, frames, input_values=audio[None, None],
                         input_values_cutoffs=torch.tensor([[audio.shape[0]]]))
    # Our side encodes the context audio itself, through the codec the checkpoint carries (codec_model.*).
    codec = MimiCodec(ours.codec_config, ours.codec_weights, "test checkpoint")
    context = [Segment(speaker=0, text="Fine, thanks.", audio=audio)]
    prompt = build_prompt(ours.tokenizer, context, 1, TEXT, lambda pcm: codec.encode(pcm[None, None])[0])
    assert prompt.rows == ids.shape[1]
    got, _ = our_frames(ours, prompt, frames)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_original_format_loads_same_weights_and_codes(ours, hf_model, tokenizer_dir, tmp_path, fmt):
    import tiny

    directory = tiny.save_original_checkpoint(hf_model, tmp_path / "orig", fmt)
    orig = checkpoint.load(str(directory), tokenizer_path=str(tokenizer_dir))
    ours_sd, orig_sd = ours.model.state_dict(), orig.model.state_dict()
    assert ours_sd.keys() == orig_sd.keys()
    for key in ours_sd:
        assert torch.equal(ours_sd[key], orig_sd[key]), key
    prompt = build_prompt(orig.tokenizer, [], 0, TEXT, None)
    assert torch.equal(our_frames(orig, prompt, 8)[0], our_frames(ours, prompt, 8)[0])


def test_seeded_sampling_is_reproducible_and_seed_dependent(ours):
    prompt = build_prompt(ours.tokenizer, [], 0, TEXT, None)
    a = our_frames(ours, prompt, 6, SamplingParams(0.9, 50, seed=123))[0]
    b = our_frames(ours, prompt, 6, SamplingParams(0.9, 50, seed=123), chunk=1)[0]
    c = our_frames(ours, prompt, 6, SamplingParams(0.9, 50, seed=124))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top1_sampling_equals_greedy(ours):
    prompt = build_prompt(ours.tokenizer, [], 0, TEXT, None)
    top1 = our_frames(ours, prompt, 5, SamplingParams(1.5, 1, seed=5))[0]
    assert torch.equal(top1, our_frames(ours, prompt, 5)[0])


def draws(logits: torch.Tensor, temperature: float, k: int, codebook: int = 2) -> torch.Tensor:
    """One draw per row, each row its own seed (rows are independent samples of the same distribution)."""
    from csmcli.sampling import frame_sampling, sample, token_keys

    n, vocab = logits.shape
    settings = frame_sampling(torch.full((n,), temperature), torch.full((n,), k), torch.arange(n),
                              torch.zeros(n, dtype=torch.long), codebook + 1, token_keys(vocab))
    return sample(logits, settings, codebook)


def test_topk_restricts_support():
    logits = torch.randn(1, 2051).repeat(4000, 1)
    k = 5
    allowed = set(logits[0].topk(k).indices.tolist())
    drawn = set(draws(logits, 1.0, k).tolist())
    assert drawn <= allowed
    assert len(drawn) == k  # every allowed token shows up in 4000 draws at temperature 1
    assert not set(draws(logits, 1.0, 2051).tolist()) <= allowed


def test_sampling_follows_softmax_of_the_top_k():
    """The Gumbel-max draw has the reference's distribution: frequencies match softmax(top-k logits / T)."""
    n, k, temperature = 20000, 4, 0.7
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, 0.1] + [-1.0] * 11).repeat(n, 1)
    counts = torch.bincount(draws(logits, temperature, k), minlength=16)[:5].float() / n
    want = torch.softmax(logits[0, :k] / temperature, dim=0)
    assert counts[4] == 0
    # 4 standard errors at n = 20000 is below 0.015 for every probability.
    assert torch.allclose(counts[:k], want, atol=0.015), (counts, want)


def test_noise_differs_per_codebook_frame_and_seed():
    from csmcli.sampling import token_keys, uniform_noise

    noise = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 3, token_keys(100))  # [2, 3, 100]
    again = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 1]), 3, token_keys(100))
    assert noise.shape == (2, 3, 100) and noise.min() > 0 and noise.max() < 1
    assert torch.equal(noise[0], again[0]) and not torch.equal(noise[1], again[1])  # frame changes row 1 only
    assert not torch.equal(noise[0, 0], noise[0, 1]) and not torch.equal(noise[0], noise[1])


def test_eos_frame_stops_generation(ours):
    """Zero heads give all-equal logits, where greedy argmax picks token 0 for every codebook: an EOS frame."""
    import copy

    ck = copy.deepcopy(ours)
    with torch.no_grad():
        ck.model.codebook0_head.weight.zero_()
        ck.model.audio_head.zero_()
    prompt = build_prompt(ck.tokenizer, [], 0, TEXT, None)
    chunks = list(Engine(ck.model).stream(prompt, GREEDY, 50, 4, 4))
    assert len(chunks) == 1 and chunks[0].stop == "eos" and chunks[0].codes.shape == (0, 32)


def test_overlong_prompt_errors_and_budget_caps(ours):
    with pytest.raises(CsmError, match="2048"):
        frame_budget(2048, 10, 2048)
    assert frame_budget(2000, 100, 2048) == 48
    with pytest.raises(CsmError, match="empty"):
        build_prompt(ours.tokenizer, [], 0, "   ", None)
