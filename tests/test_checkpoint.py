"""Checkpoint loading edge cases: sharded HF files, and broken files named in one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from csmcli import checkpoint
from csmcli.errors import CsmError


@pytest.fixture
def hf_copy(hf_checkpoint, tmp_path):
    return shutil.copytree(hf_checkpoint, tmp_path / "ck")


def test_sharded_hf_checkpoint_loads_same_weights(hf_model, hf_checkpoint, tokenizer_dir, tmp_path):
    import tiny

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    hf_model.save_pretrained(str(sharded), max_shard_size="2MB")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, sharded / f.name)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    one, many = checkpoint.load(str(hf_checkpoint)), checkpoint.load(str(sharded))
    for key, value in one.model.state_dict().items():
        assert torch.equal(value, many.model.state_dict()[key]), key
    assert many.codec_weights.keys() == one.codec_weights.keys()
    assert tiny  # the module that built both


def _rewrite(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(hf_copy):
    _rewrite(hf_copy, lambda t: t.pop("backbone_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CsmError, match=r"model.safetensors: missing tensor 'backbone_model.layers.1.mlp.up_proj"):
        checkpoint.load(str(hf_copy))


def test_misshaped_tensor_is_named(hf_copy):
    def shrink(t):
        t["lm_head.weight"] = t["lm_head.weight"][:-1].contiguous()

    _rewrite(hf_copy, shrink)
    with pytest.raises(CsmError, match=r"'codebook0_head.weight' has shape \[2050, 64\], expected \[2051, 64\]"):
        checkpoint.load(str(hf_copy))


def test_corrupt_safetensors_and_config(hf_copy):
    (hf_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CsmError, match=r"model\.safetensors: not a readable safetensors file"):
        checkpoint.load(str(hf_copy))
    (hf_copy / "config.json").write_text("{broken")
    with pytest.raises(CsmError, match=r"config\.json: not valid JSON"):
        checkpoint.load(str(hf_copy))
    (hf_copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CsmError, match="neither a transformers CSM config nor a Sesame original config"):
        checkpoint.load(str(hf_copy))


def test_bad_source_names(tmp_path):
    with pytest.raises(CsmError, match="no such directory"):
        checkpoint.load(str(tmp_path / "missing" / "dir"))
    with pytest.raises(CsmError, match=r"config\.json: file not found"):
        checkpoint.load(str(tmp_path))


def test_original_format_corrupt_pt(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M", "text_vocab_size": 128256,
        "audio_vocab_size": 2051, "audio_num_codebooks": 32}))
    (tmp_path / "ckpt.pt").write_bytes(b"garbage, not a zip or pickle")
    with pytest.raises(CsmError, match=r"ckpt\.pt: not a readable checkpoint"):
        checkpoint.load(str(tmp_path))


def test_hf_config_round_trip(hf_checkpoint):
    ck = checkpoint.load(str(hf_checkpoint))
    assert checkpoint.config_from_hf(checkpoint.hf_config(ck.model.cfg).to_dict()) == ck.model.cfg
    assert ck.model.cfg.backbone.rope_scaling is not None  # llama3 scaling read from rope_parameters


def test_a_directory_without_tokenizer_json_is_named_as_such(tmp_path):
    """transformers blamed a missing sentencepiece / tiktoken for a directory that has no tokenizer at all."""
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CsmError, match=r"no tokenizer.json there; pass --tokenizer DIR with a Llama-3 tokenizer.json"):
        checkpoint.load_tokenizer(tmp_path)


def test_weights_are_read_once_each_and_cast_as_loading_whole_then_casting(hf_checkpoint, monkeypatch):
    """The loader reads tensor by tensor (never the whole file into memory at once) and casts each where it goes;
    the result must be what reading everything in float32 and casting the model afterwards gives."""
    reads: list[str] = []
    get = checkpoint.SafetensorsFiles.__getitem__
    monkeypatch.setattr(checkpoint.SafetensorsFiles, "__getitem__", lambda self, k: reads.append(k) or get(self, k))
    lazy = checkpoint.load(str(hf_checkpoint), dtype=torch.bfloat16)
    assert len(reads) == len(set(reads))  # none read twice
    stored = load_file(str(hf_checkpoint / "model.safetensors"))
    # every stored tensor is read, but of the tied audio embeddings' two names only one (save_pretrained may keep one)
    assert set(reads) <= set(stored)
    assert set(stored) - set(reads) <= {"depth_decoder.model.embed_tokens.weight"}
    monkeypatch.undo()
    whole = checkpoint.load(str(hf_checkpoint))  # float32, as stored
    for key, value in whole.model.state_dict().items():
        assert lazy.model.state_dict()[key].dtype == (torch.bfloat16 if value.is_floating_point() else value.dtype)
        assert torch.equal(lazy.model.state_dict()[key], value.to(lazy.model.state_dict()[key].dtype)), key
    for key, value in lazy.codec_weights.items():  # the codec stays float32
        assert torch.equal(value, stored[f"codec_model.{key}"]), key


def test_safetensors_files_are_closed_after_loading(hf_checkpoint, monkeypatch):
    opened: list[checkpoint.SafetensorsFiles] = []
    init = checkpoint.SafetensorsFiles.__init__
    monkeypatch.setattr(checkpoint.SafetensorsFiles, "__init__",
                        lambda self, path: opened.append(self) or init(self, path))
    checkpoint.load(str(hf_checkpoint))
    assert opened
    for files in opened:
        with pytest.raises(CsmError, match="closed"):
            files[next(iter(files))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loading_onto_the_gpu_casts_as_the_cpu_does(hf_checkpoint, dtype):
    on_gpu = checkpoint.load(str(hf_checkpoint), device="cuda", dtype=dtype).model.state_dict()
    on_cpu = checkpoint.load(str(hf_checkpoint), dtype=dtype).model.state_dict()
    for key, value in on_cpu.items():
        assert on_gpu[key].is_cuda and torch.equal(on_gpu[key].cpu(), value), key


def test_loading_imports_no_heavy_module_it_does_not_need(hf_checkpoint):
    """What a `say` start-up must not import: torch._dynamo (arithmetic on `meta` tensors, where models are built
    before their weights, imports it: ~1.3 s) and transformers at all (its tokenizer classes, `activations` and, with
    transformers 5.17, its config classes reach its generation code and torch._dynamo: 11 s, 6 s and 6-8 s on a GPU
    box; transformers alone ~0.7 s on 2 CPU cores)."""
    import subprocess
    import sys

    heavy = ["torch._dynamo", "transformers"]
    code = (
        "import sys\n"
        "from csmcli.pipeline import Pipeline, choose_preset\n"
        "preset, _ = choose_preset(None, 'cpu', {})\n"
        f"Pipeline.load({str(hf_checkpoint)!r}, preset, device='cpu').warmup()\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


TOKENIZER_TEXTS = [
    "[0]Hello there, how are you doing today?",
    "[1]Text that spells <|end_of_text|> and <|begin_of_text|> and x<|audio_eos|>y.",
    "[0]  two  spaces,\ttabs,\nnew lines\n\nand trailing space ",
    "[3]Ünïcödé, emoji 🙂, CJK 漢字, RTL שלום, zero-width\u200bspace, a\u00a0b\u3000c.",
    "[0]",
    "[0]I'm, you're, they'LL 12345678 <|reserved_special_token_5|> <|end_of_text",
    "\r\n\r\nx",
]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


@pytest.fixture(params=["tiny", "llama3 pipeline"])
def tokenizer_variant(request, hf_checkpoint, tmp_path):
    """The tests' tokenizer, and the same vocabulary behind Llama-3's own pre-tokenizer (its regex split, then bytes)
    and post-processor (<|begin_of_text|> first), as Llama-3's tokenizer.json has them."""
    if request.param == "tiny":
        return hf_checkpoint
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_checkpoint / name, tmp_path / name)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                                       "tokens": ["<|begin_of_text|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return tmp_path


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("special", [True, False])
def test_the_tokenizer_gives_transformers_ids(tokenizer_variant, split, special):
    """csmcli runs tokenizer.json through the `tokenizers` library without transformers' classes: the ids must be
    transformers' fast tokenizer's, special tokens spelled in the text included."""
    from transformers import AutoTokenizer

    ours = checkpoint.load_tokenizer(tokenizer_variant)
    reference = AutoTokenizer.from_pretrained(str(tokenizer_variant), local_files_only=True)
    for text in TOKENIZER_TEXTS:
        want = reference.encode(text, add_special_tokens=special, split_special_tokens=split)
        assert ours.encode(text, add_special_tokens=special, split_special_tokens=split) == want, text
    # the switch is per call: after a split call, an unsplit one sees special tokens again
    assert 128001 in ours.encode(TOKENIZER_TEXTS[1], split_special_tokens=False)


def test_a_malformed_tokenizer_json_is_one_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": "not a tokenizer"}')
    with pytest.raises(CsmError, match=r"no usable tokenizer"):
        checkpoint.load_tokenizer(tmp_path)
