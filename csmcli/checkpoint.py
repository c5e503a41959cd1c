"""Checkpoint loading: HF-format directories, original Sesame checkpoints, hub ids via the HF cache, random weights.

Every format ends as our own `Csm` module (`model.py`) plus a tokenizer and, where the checkpoint has one, the Mimi
codec weights. Errors a user can fix (missing file, wrong key, gated repo) become `CsmError`s naming the file/key.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from csmcli.errors import CsmError
from csmcli.model import CSM_1B, Csm, CsmConfig, Linear, RopeScaling, TransformerConfig

DEFAULT_MODEL = "sesame/csm-1b"
LICENSE_HINT = (
    "accept the license at https://huggingface.co/{repo} and log in with `hf auth login` (or set HF_TOKEN)"
)


@dataclass
class Checkpoint:
    """What a model source provides. `codec_weights` is a flat Mimi state dict (None: codec not included)."""

    model: Csm
    tokenizer: Any | None
    codec_config: dict | None
    codec_weights: dict[str, Tensor] | None
    source: str
    random_weights: bool = False


# ---------------------------------------------------------------- configs


def _rope(cfg: dict) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 500_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CsmError(f"unsupported rope_type {kind!r} in config (expected 'llama3' or 'default')")
    scaling = RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
    return theta, scaling


def _transformer_from_hf(cfg: dict, max_seq_len: int | None = None) -> TransformerConfig:
    theta, scaling = _rope(cfg)
    heads = cfg["num_attention_heads"]
    return TransformerConfig(
        n_layers=cfg["num_hidden_layers"],
        dim=cfg["hidden_size"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate_size=cfg["intermediate_size"],
        max_seq_len=max_seq_len or cfg["max_position_embeddings"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
    )


def config_from_hf(cfg: dict) -> CsmConfig:
    """transformers `CsmConfig` dict (config.json with `model_type: csm`) -> our config."""
    try:
        return CsmConfig(
            backbone=_transformer_from_hf(cfg),
            decoder=_transformer_from_hf(cfg["depth_decoder_config"]),
            text_vocab_size=cfg["text_vocab_size"],
            audio_vocab_size=cfg["vocab_size"],
            num_codebooks=cfg["num_codebooks"],
        )
    except KeyError as e:
        raise CsmError(f"config.json lacks {e.args[0]!r}") from None


ORIGINAL_FLAVORS = {"llama-1B": CSM_1B.backbone, "llama-100M": CSM_1B.decoder}


def _flavor(value: str | dict, max_seq_len: int) -> TransformerConfig:
    if isinstance(value, dict):  # explicit sizes: small test checkpoints and custom fine-tunes
        known = {f.name for f in fields(TransformerConfig)}
        kwargs = {k: v for k, v in value.items() if k in known and k != "rope_scaling"}
        scaling = value.get("rope_scaling", {})
        kwargs["rope_scaling"] = None if scaling is None else RopeScaling(**scaling)
        return TransformerConfig(**{"max_seq_len": max_seq_len, **kwargs})
    if value not in ORIGINAL_FLAVORS:
        raise CsmError(f"unknown flavor {value!r} in config.json (known: {', '.join(ORIGINAL_FLAVORS)})")
    return ORIGINAL_FLAVORS[value]


def config_from_original(cfg: dict) -> CsmConfig:
    """Sesame's small config.json (`backbone_flavor`, `decoder_flavor`, vocab sizes) -> our config."""
    try:
        return CsmConfig(
            backbone=_flavor(cfg["backbone_flavor"], CSM_1B.backbone.max_seq_len),
            decoder=_flavor(cfg["decoder_flavor"], CSM_1B.decoder.max_seq_len),
            text_vocab_size=cfg["text_vocab_size"],
            audio_vocab_size=cfg["audio_vocab_size"],
            num_codebooks=cfg["audio_num_codebooks"],
        )
    except KeyError as e:
        raise CsmError(f"config.json lacks {e.args[0]!r}") from None


# ---------------------------------------------------------------- state dicts


def _layer_keys(cfg: TransformerConfig, ours: str, names: dict[str, str]) -> dict[str, str]:
    return {
        f"{ours}.layers.{i}.{dst}": src.format(i=i)
        for i in range(cfg.n_layers)
        for dst, src in names.items()
    }


HF_LAYER = {
    "attention_norm.weight": "layers.{i}.input_layernorm.weight",
    "ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "attention.wo.weight": "layers.{i}.self_attn.o_proj.weight",
    "feed_forward.w2.weight": "layers.{i}.mlp.down_proj.weight",
}
ORIGINAL_LAYER = {
    "attention_norm.weight": "layers.{i}.sa_norm.scale",
    "ffn_norm.weight": "layers.{i}.mlp_norm.scale",
    "attention.wo.weight": "layers.{i}.attn.output_proj.weight",
    "feed_forward.w2.weight": "layers.{i}.mlp.w2.weight",
}


class _Source:
    """A state dict with the file it came from, so a missing key names both. Each tensor is moved to `device` and
    then cast to `dtype` as it is taken: with a lazy `tensors` (`SafetensorsFiles`) a float32 checkpoint is read one
    tensor at a time and cast where it will run, instead of whole into host memory and cast by the CPU."""

    def __init__(self, tensors: Mapping[str, Tensor], origin: str, device, dtype: torch.dtype, prefix: str = ""):
        self.tensors, self.origin, self.device, self.dtype, self.prefix = tensors, origin, device, dtype, prefix

    def get(self, *keys: str) -> Tensor:
        for key in keys:
            if self.prefix + key in self.tensors:
                return self.tensors[self.prefix + key].to(self.device).to(self.dtype)
        raise CsmError(f"{self.origin}: missing tensor {keys[0]!r}")


def interleaved_to_halves(w: Tensor, n_heads: int) -> Tensor:
    """torchtune rotates interleaved pairs, transformers rotates halves: permute each head's q/k rows."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _map_stack(src: _Source, cfg: TransformerConfig, ours: str, theirs: str, original: bool) -> dict[str, Tensor]:
    names = ORIGINAL_LAYER if original else HF_LAYER
    out = {dst: src.get(f"{theirs}.{key}") for dst, key in _layer_keys(cfg, ours, names).items()}
    for i in range(cfg.n_layers):
        p = f"{theirs}.layers.{i}"
        if original:
            q = interleaved_to_halves(src.get(f"{p}.attn.q_proj.weight"), cfg.n_heads)
            k = interleaved_to_halves(src.get(f"{p}.attn.k_proj.weight"), cfg.n_kv_heads)
            v = src.get(f"{p}.attn.v_proj.weight")
            gate, up = src.get(f"{p}.mlp.w1.weight"), src.get(f"{p}.mlp.w3.weight")
        else:
            q, k, v = (src.get(f"{p}.self_attn.{n}_proj.weight") for n in "qkv")
            gate, up = src.get(f"{p}.mlp.gate_proj.weight"), src.get(f"{p}.mlp.up_proj.weight")
        out[f"{ours}.layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v])
        out[f"{ours}.layers.{i}.feed_forward.w13.weight"] = torch.cat([gate, up])
    out[f"{ours}.norm.weight"] = src.get(f"{theirs}.norm.scale" if original else f"{theirs}.norm.weight")
    return out


def state_dict_from_hf(src: _Source, cfg: CsmConfig) -> dict[str, Tensor]:
    out = _map_stack(src, cfg.backbone, "backbone", "backbone_model", original=False)
    out |= _map_stack(src, cfg.decoder, "decoder", "depth_decoder.model", original=False)
    out["text_embeddings.weight"] = src.get("embed_text_tokens.weight")
    # Tied in transformers: save_pretrained may keep only one of the two copies.
    out["audio_embeddings.weight"] = src.get(
        "backbone_model.embed_tokens.embed_audio_tokens.weight", "depth_decoder.model.embed_tokens.weight"
    )
    out["projection.weight"] = src.get("depth_decoder.model.inputs_embeds_projector.weight")
    out["codebook0_head.weight"] = src.get("lm_head.weight")
    out["audio_head"] = src.get("depth_decoder.codebooks_head.weight")
    return out


def state_dict_from_original(src: _Source, cfg: CsmConfig) -> dict[str, Tensor]:
    out = _map_stack(src, cfg.backbone, "backbone", "backbone", original=True)
    out |= _map_stack(src, cfg.decoder, "decoder", "decoder", original=True)
    for key in ("text_embeddings.weight", "audio_embeddings.weight", "projection.weight", "codebook0_head.weight"):
        out[key] = src.get(key)
    out["audio_head"] = src.get("audio_head")
    return out


def build_model(cfg: CsmConfig, state_dict: dict[str, Tensor], origin: str) -> Csm:
    """Build on `meta` (no init cost), then take the tensors as they are (assign=True: on their device, in their
    dtype, as `_Source` gave them), checking every shape."""
    with torch.device("meta"):
        model = Csm(cfg)
    expected = model.state_dict()
    for key, tensor in state_dict.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise CsmError(
                f"{origin}: tensor for {key!r} has shape {list(tensor.shape)}, expected {list(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise CsmError(f"{origin}: missing tensor for {missing[0]!r}")
    model.load_state_dict(state_dict, assign=True, strict=True)
    model.reset_buffers()
    return model.eval().requires_grad_(False)


def random_model(cfg: CsmConfig, device, dtype, seed: int = 0) -> Csm:
    """Any config (default: full-size CSM-1B) with seeded random weights: benchmarks without a download."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = Csm(cfg)
    model = model.to_empty(device=device).to(dtype)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
    model.reset_buffers()
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- files


def safetensors_files(path: Path) -> list[Path]:
    """A .safetensors file itself, or a directory's shards (by its index) or its single `model.safetensors`."""
    if not path.is_dir():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / shard for shard in sorted(set(read_json(index).get("weight_map", {}).values()))]
    return [path / "model.safetensors"]


class SafetensorsFiles(Mapping[str, Tensor]):
    """The tensors of `safetensors_files(path)` by name, each read from its (memory-mapped) file when looked up;
    use as a context manager, which closes the files. A missing or unreadable file is a CsmError naming it."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._files = contextlib.ExitStack()
        self._where: dict[str, tuple[Any, Path]] = {}  # name -> (open file, its path)
        try:
            for f in safetensors_files(path):
                if not f.exists():
                    raise CsmError(f"{f}: file not found")
                with self._readable(f):
                    handle = self._files.enter_context(safe_open(str(f), framework="pt"))
                    self._where |= dict.fromkeys(handle.keys(), (handle, f))
        except BaseException:
            self._files.close()
            raise

    @staticmethod
    @contextlib.contextmanager
    def _readable(f: Path) -> Iterator[None]:
        from safetensors import SafetensorError

        try:
            yield
        except (SafetensorError, OSError, ValueError) as e:
            raise CsmError(f"{f}: not a readable safetensors file ({e})") from None

    def __getitem__(self, name: str) -> Tensor:
        handle, f = self._where[name]
        with self._readable(f):
            return handle.get_tensor(name)

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the tensor to find out
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __enter__(self) -> SafetensorsFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._files.close()


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of `safetensors_files(path)`, read now; a missing or unreadable file is a CsmError naming it."""
    with SafetensorsFiles(path) as files:
        return dict(files)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CsmError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CsmError(f"{path}: not valid JSON ({e})") from None


class TextTokenizer:
    """A checkpoint's `tokenizer.json` (Llama-3's byte-level BPE) run by the `tokenizers` library itself, which is
    what transformers' fast tokenizers wrap: the same ids, without importing transformers' tokenizer classes
    (`AutoTokenizer` on a CSM checkpoint took 11 s the first time on the GPU image's transformers 5.17, its import
    chain reaching transformers' generation code; 1.3 s with 5.24 on the 2-core CI machine)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `split_special_tokens`: text that spells a special token is tokenized as text (as
        transformers' option of that name does)."""
        self._tokenizer.encode_special_tokens = split_special_tokens
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def load_tokenizer(path: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    if not path.is_dir():
        raise CsmError(f"{path}: no such tokenizer directory")
    if not (path / "tokenizer.json").is_file():
        raise CsmError(f"{path}: no tokenizer.json there; pass --tokenizer DIR with a Llama-3 tokenizer.json")
    try:
        return TextTokenizer(Tokenizer.from_file(str(path / "tokenizer.json")))
    except Exception as e:  # the library raises a bare Exception for a malformed file
        raise CsmError(f"{path}: no usable tokenizer ({e}); pass --tokenizer DIR with tokenizer.json") from None


def _split_codec(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    prefix = "codec_model."
    return {k[len(prefix):]: tensors[k] for k in tensors if k.startswith(prefix)}  # reads only the codec's


def load_hf_dir(directory: Path, device, dtype, tokenizer_path: Path | None = None) -> Checkpoint:
    cfg_json = read_json(directory / "config.json")
    cfg = config_from_hf(cfg_json)
    index = directory / "model.safetensors.index.json"
    origin = str(index if index.exists() else directory / "model.safetensors")  # errors name the file
    with SafetensorsFiles(directory) as tensors:
        model = build_model(cfg, state_dict_from_hf(_Source(tensors, origin, device, dtype), cfg), origin)
        codec_weights = _split_codec(tensors) or None
    return Checkpoint(
        model=model,
        tokenizer=load_tokenizer(tokenizer_path or directory),
        codec_config=cfg_json.get("codec_config"),
        codec_weights=codec_weights,
        source=str(directory),
    )


@contextlib.contextmanager
def _original_weights(directory: Path, device, dtype) -> Iterator[_Source]:
    st, pt = directory / "model.safetensors", directory / "ckpt.pt"
    if st.exists():
        with SafetensorsFiles(directory) as tensors:
            yield _Source(tensors, str(st), device, dtype, _model_prefix(tensors))
        return
    if not pt.exists():
        raise CsmError(f"{directory}: neither model.safetensors nor ckpt.pt found")
    try:
        tensors = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a corrupt pickle
        raise CsmError(f"{pt}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    tensors = tensors.get("model", tensors)
    yield _Source(tensors, str(pt), device, dtype, _model_prefix(tensors))


def _model_prefix(tensors: Mapping[str, Tensor]) -> str:
    """Some exports prefix every key with `model.`; the original key names start below it."""
    return "model." if tensors and all(k.startswith("model.") for k in tensors) else ""


def load_original_dir(directory: Path, device, dtype, tokenizer_path: Path | None = None) -> Checkpoint:
    cfg = config_from_original(read_json(directory / "config.json"))
    with _original_weights(directory, device, dtype) as src:
        origin = src.origin
        model = build_model(cfg, state_dict_from_original(src, cfg), origin)
    tok_dir = tokenizer_path or directory
    tokenizer = load_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").exists() or tokenizer_path else None
    return Checkpoint(model=model, tokenizer=tokenizer, codec_config=None, codec_weights=None, source=origin)


def load_directory(directory: Path, device, dtype, tokenizer_path: Path | None = None) -> Checkpoint:
    cfg = read_json(directory / "config.json")
    if cfg.get("model_type") == "csm":
        return load_hf_dir(directory, device, dtype, tokenizer_path)
    if "backbone_flavor" in cfg:
        return load_original_dir(directory, device, dtype, tokenizer_path)
    raise CsmError(f"{directory / 'config.json'}: neither a transformers CSM config nor a Sesame original config")


# ---------------------------------------------------------------- hub


HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "ckpt.pt"]


def resolve_hub(repo_id: str) -> Path:
    """Snapshot from the HF cache (downloading only what is missing; HF_HUB_OFFLINE honoured).

    Every hub failure becomes one line that says what to do (tests/test_hub.py runs each against a fake hub).
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    login = LICENSE_HINT.format(repo=repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise CsmError(f"{repo_id} is gated: {login}") from None
    except RepositoryNotFoundError as e:
        if _status(e) == 401:  # no (valid) token: the hub cannot say whether it is gated, private or absent
            raise CsmError(f"{repo_id}: not found, or private and you are not logged in (401): {login}") from None
        raise CsmError(
            f"{repo_id}: not found on the hub ({_status(e)}); check the id, or if it is private: log in with "
            "`hf auth login` (or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError as e:
        # snapshot_download wraps whatever kept it from the hub (offline, no connection, an HTTP error) in this.
        cause, status = e.__cause__, _status(e.__cause__)
        if type(e).__name__ == "IncompleteSnapshotError":  # a subclass only recent huggingface_hub has
            raise CsmError(
                f"{repo_id}: its copy in the local Hugging Face cache is incomplete (an interrupted download?) and "
                "the hub cannot be reached: download it again online"
            ) from None
        if constants.HF_HUB_OFFLINE or isinstance(cause, OfflineModeIsEnabled):
            raise CsmError(
                f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it once "
                "online, or pass a local directory / --random-weights"
            ) from None
        if status in (401, 403):
            raise CsmError(f"{repo_id}: access denied ({status}): {login}") from None
        if status is not None:
            raise CsmError(
                f"{repo_id}: the hub answered {status} and the model is not in the local Hugging Face cache; "
                "try again later"
            ) from None
        raise CsmError(
            f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline?): download it once online, or pass a local directory, or --random-weights (say / stream: "
            "with --tokenizer DIR)"
        ) from None
    except HfHubHTTPError as e:
        status = _status(e)
        if status in (401, 403):
            raise CsmError(f"{repo_id}: access denied ({status}): {login}") from None
        # the server's own words, else the first line of huggingface_hub's (the rest is a wall of advice)
        detail = (getattr(e, "server_message", None) or str(e) or type(e).__name__).strip().splitlines()[0]
        raise CsmError(f"{repo_id}: hub request failed ({status}): {detail}") from None


def _status(error: BaseException | None) -> int | None:
    """The HTTP status of a huggingface_hub error (None: not an HTTP answer)."""
    return getattr(getattr(error, "response", None), "status_code", None)


def load(
    source: str | None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer_path: str | None = None,
    random_weights: bool = False,
    config: CsmConfig = CSM_1B,
) -> Checkpoint:
    """A local directory, a hub id (default sesame/csm-1b), or random weights of `config`."""
    tok = Path(tokenizer_path) if tokenizer_path else None
    if random_weights:
        tokenizer = load_tokenizer(tok) if tok else None
        return Checkpoint(random_model(config, device, dtype), tokenizer, None, None, "random weights", True)
    source = source or DEFAULT_MODEL
    path = Path(source).expanduser()
    if path.is_dir():
        return load_directory(path, device, dtype, tok)
    if path.exists():  # a file of the checkpoint (model.safetensors): its directory
        if not (path.parent / "config.json").exists():
            raise CsmError(f"{source}: a file, not a checkpoint directory ({path.parent} holds no config.json)")
        return load_directory(path.parent, device, dtype, tok)
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise CsmError(f"{source}: no such directory, and not a hub id of the form owner/name")
    return load_directory(resolve_hub(source), device, dtype, tok)


# ---------------------------------------------------------------- back to transformers (for --compare)


def _hf_transformer_dict(cfg: TransformerConfig) -> dict:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **vars(cfg.rope_scaling)}
    return {
        "num_hidden_layers": cfg.n_layers, "hidden_size": cfg.dim, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope,
    }


def hf_config(cfg: CsmConfig, codec_config: dict | None = None) -> Any:
    """Our config as a transformers `CsmConfig` (the inverse of `config_from_hf`)."""
    from transformers import CsmConfig as HfCsmConfig

    decoder = _hf_transformer_dict(cfg.decoder) | {
        "num_codebooks": cfg.num_codebooks, "backbone_hidden_size": cfg.backbone.dim,
        "vocab_size": cfg.audio_vocab_size,
    }
    return HfCsmConfig(
        **_hf_transformer_dict(cfg.backbone), num_codebooks=cfg.num_codebooks, vocab_size=cfg.audio_vocab_size,
        text_vocab_size=cfg.text_vocab_size, depth_decoder_config=decoder, codec_config=codec_config,
    )


def hf_state_dict(model: Csm) -> dict[str, Tensor]:
    """Our weights under transformers' names (codec excluded): the inverse of `state_dict_from_hf`. fp8 weights are
    given dequantized, in the model's dtype."""
    cfg, sd = model.cfg, model.state_dict()
    dtype = model.codebook0_head.weight.dtype
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.scale is not None:
            sd[f"{name}.weight"] = (module.weight.float() * module.scale[:, None]).to(dtype)
    out = {
        "embed_text_tokens.weight": sd["text_embeddings.weight"],
        "backbone_model.embed_tokens.embed_audio_tokens.weight": sd["audio_embeddings.weight"],
        "depth_decoder.model.embed_tokens.weight": sd["audio_embeddings.weight"],
        "depth_decoder.model.inputs_embeds_projector.weight": sd["projection.weight"],
        "lm_head.weight": sd["codebook0_head.weight"],
        "depth_decoder.codebooks_head.weight": sd["audio_head"],
    }
    for ours, theirs, tcfg in (("backbone", "backbone_model", cfg.backbone),
                               ("decoder", "depth_decoder.model", cfg.decoder)):
        for dst, src in _layer_keys(tcfg, ours, HF_LAYER).items():
            out[f"{theirs}.{src}"] = sd[dst]
        for i in range(tcfg.n_layers):
            p, q = f"{theirs}.layers.{i}", f"{ours}.layers.{i}"
            sizes = [tcfg.n_heads * tcfg.head_dim, tcfg.n_kv_heads * tcfg.head_dim, tcfg.n_kv_heads * tcfg.head_dim]
            for name, w in zip("qkv", sd[f"{q}.attention.wqkv.weight"].split(sizes), strict=True):
                out[f"{p}.self_attn.{name}_proj.weight"] = w
            gate, up = sd[f"{q}.feed_forward.w13.weight"].split(tcfg.intermediate_size)
            out[f"{p}.mlp.gate_proj.weight"], out[f"{p}.mlp.up_proj.weight"] = gate, up
        out[f"{theirs}.norm.weight"] = sd[f"{ours}.norm.weight"]
    return out
