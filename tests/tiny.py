"""Tiny random CSM checkpoints in the real on-disk formats, built in the test (no hub, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SPECIAL_TOKENS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128002: "<|AUDIO|>", 128003: "<|audio_eos|>"}
TEXT_VOCAB = 128256
CORPUS = [
    "Hello there, how are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "Speech synthesis turns text into sound, one frame at a time.",
] * 20


def save_tokenizer(directory: Path) -> None:
    """A real byte-level BPE trained on a few lines, padded so the Llama-3 special ids land where CSM expects."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), 128000):
        vocab[f"<unused_{i}>"] = i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = [SPECIAL_TOKENS.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, TEXT_VOCAB)]
    tok.add_special_tokens(names)
    assert tok.token_to_id("<|begin_of_text|>") == 128000 and tok.token_to_id("<|audio_eos|>") == 128003
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.save_pretrained(str(directory))


def tiny_mimi_config():
    from transformers import MimiConfig

    return MimiConfig(
        hidden_size=32, num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4], codebook_size=2048,
        codebook_dim=16, vector_quantization_hidden_dimension=16, num_quantizers=32, num_semantic_quantizers=1,
        num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, intermediate_size=64, sliding_window=4, upsample_groups=32,
    )


def tiny_csm_config(num_codebooks: int = 32):
    from transformers import CsmConfig

    return CsmConfig(
        num_codebooks=num_codebooks, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_parameters=dict(LLAMA3_ROPE),
        depth_decoder_config=dict(
            num_codebooks=num_codebooks, backbone_hidden_size=64, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=num_codebooks + 1, rope_parameters=dict(LLAMA3_ROPE),
        ),
        codec_config=tiny_mimi_config().to_dict(),
    )


def tiny_hf_model(seed: int = 0):
    """Random float32 CsmForConditionalGeneration; norms randomised too so a swapped norm cannot go unnoticed."""
    from transformers import CsmForConditionalGeneration

    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(tiny_csm_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("codec_model"):
                continue
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p) / p.shape[-1] ** 0.5)
        # transformers starts Mimi's codebooks at zero: every code would decode to the same audio, and a test that
        # compares audio could not see a wrong code
        for name, t in model.codec_model.named_buffers():
            if name.endswith("embed_sum"):
                t.normal_()
    return model


def save_hf_checkpoint(model, directory: Path, tokenizer_dir: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    for f in tokenizer_dir.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    return directory


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of the loader's q/k permutation: transformers (rotate halves) -> torchtune (interleaved pairs)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def save_original_checkpoint(model, directory: Path, fmt: str = "safetensors") -> Path:
    """Write the HF model's weights under Sesame's original (torchtune) names, as `model.safetensors` or `ckpt.pt`."""
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {
        "text_embeddings.weight": sd["embed_text_tokens.weight"],
        "audio_embeddings.weight": sd["depth_decoder.model.embed_tokens.weight"],
        "projection.weight": sd["depth_decoder.model.inputs_embeds_projector.weight"],
        "codebook0_head.weight": sd["lm_head.weight"],
        "audio_head": sd["depth_decoder.codebooks_head.weight"],
    }
    flavors = {}
    for ours, theirs, sub in (("backbone", "backbone_model", cfg), ("decoder", "depth_decoder.model",
                                                                    cfg.depth_decoder_config)):
        for i in range(sub.num_hidden_layers):
            p, q = f"{theirs}.layers.{i}", f"{ours}.layers.{i}"
            out[f"{q}.attn.q_proj.weight"] = halves_to_interleaved(sd[f"{p}.self_attn.q_proj.weight"],
                                                                   sub.num_attention_heads)
            out[f"{q}.attn.k_proj.weight"] = halves_to_interleaved(sd[f"{p}.self_attn.k_proj.weight"],
                                                                   sub.num_key_value_heads)
            out[f"{q}.attn.v_proj.weight"] = sd[f"{p}.self_attn.v_proj.weight"]
            out[f"{q}.attn.output_proj.weight"] = sd[f"{p}.self_attn.o_proj.weight"]
            out[f"{q}.mlp.w1.weight"] = sd[f"{p}.mlp.gate_proj.weight"]
            out[f"{q}.mlp.w3.weight"] = sd[f"{p}.mlp.up_proj.weight"]
            out[f"{q}.mlp.w2.weight"] = sd[f"{p}.mlp.down_proj.weight"]
            out[f"{q}.sa_norm.scale"] = sd[f"{p}.input_layernorm.weight"]
            out[f"{q}.mlp_norm.scale"] = sd[f"{p}.post_attention_layernorm.weight"]
        out[f"{ours}.norm.scale"] = sd[f"{theirs}.norm.weight"]
        flavors[ours] = {
            "n_layers": sub.num_hidden_layers, "dim": sub.hidden_size, "n_heads": sub.num_attention_heads,
            "n_kv_heads": sub.num_key_value_heads, "head_dim": sub.head_dim, "intermediate_size": sub.intermediate_size,
            "norm_eps": sub.rms_norm_eps, "rope_theta": 500000.0,
            "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")},
        }
    directory.mkdir(parents=True, exist_ok=True)
    out = {k: v.contiguous() for k, v in out.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(out, str(directory / "model.safetensors"))
    else:
        torch.save(out, directory / "ckpt.pt")
    config = {"backbone_flavor": flavors["backbone"], "decoder_flavor": flavors["decoder"],
              "text_vocab_size": cfg.text_vocab_size, "audio_vocab_size": cfg.vocab_size,
              "audio_num_codebooks": cfg.num_codebooks}
    (directory / "config.json").write_text(json.dumps(config))
    return directory
