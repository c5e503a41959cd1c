"""Generation: a batch-ready frame stepper over static state.

The stepper keeps everything a frame needs in fixed-shape device tensors (per-slot positions, last hidden state,
sampling settings, frame counters), so `step()` has no host sync and no shape change: the engine can capture it
in a CUDA graph as it is. The host looks at codes once per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from csmcli.model import Csm
from csmcli.prompt import Prompt
from csmcli.sampling import FrameSampling, SamplingParams, frame_sampling, sample, token_keys

FRAME_SECONDS = 0.08
SAMPLE_RATE = 24_000


class FrameStepper:
    """`max_batch` independent slots sharing one frame step. Slots join by `prefill` between steps."""

    def __init__(self, model: Csm, max_batch: int, fused: bool = False):
        self.model = model
        self.fused = fused  # one-token steps through csmcli.kernels (Triton) instead of torch ops
        param = model.codebook0_head.weight
        self.device, self.dtype = param.device, param.dtype
        self.caches = model.new_caches(max_batch)  # this stepper's own: other steppers may share the model
        b, dev = max_batch, self.device
        self.max_batch = max_batch
        self.max_seq_len = model.cfg.backbone.max_seq_len
        self.hidden = torch.zeros(b, model.cfg.backbone.dim, dtype=self.dtype, device=dev)  # [B, dim]
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)  # next backbone position per slot
        self.frame_index = torch.zeros(b, dtype=torch.long, device=dev)  # per-slot RNG counter
        self.temperature = torch.ones(b, dtype=torch.float32, device=dev)
        self.topk = torch.full((b,), 50, dtype=torch.long, device=dev)
        self.seed = torch.zeros(b, dtype=torch.long, device=dev)
        self.codes = torch.zeros(b, model.cfg.num_codebooks, dtype=torch.long, device=dev)  # [B, 32] last frame
        self.token_keys = token_keys(model.cfg.audio_vocab_size, dev)  # [V]
        # The fused codebook heads read their weights row by row: a transposed copy (130 MB at full size), taken
        # now: weights loaded into the model later are not seen (load them before building an engine).
        self.audio_head_rows = model.audio_head.transpose(1, 2).contiguous() if fused else None  # [C-1, V, dim]
        # Likewise every code's depth-decoder input, projected once (130 MB): the draws copy out their rows.
        with torch.no_grad():
            self.code_inputs = model.projected_code_embeddings() if fused else None  # [(C-1) * V, decoder dim]
        self.heads_folded = False
        if fused:
            from csmcli import kernels  # here, so CPU-only installs never need Triton

            if kernels.folds_norms(max_batch):
                # The decoder's final norm into the heads' rows (our own copy: no memory added); they stay bf16
                # with fp8 layers.
                self.audio_head_rows = kernels.fold_norm(self.audio_head_rows, model.decoder.norm.weight)
                self.heads_folded = True
                if not model.fp8:  # normed weights for the batched tiles (1.4 GB at full size, once)
                    model.backbone.fold_norms()
                    model.decoder.fold_norms()

    def l2_weights(self) -> tuple[list[Tensor], list[Tensor]]:
        """The weights the fused frame step gives L2 cache hints, as `kernels.reserve_l2` takes them: the depth
        decoder's QKV and output weights to persist; streaming, its MLP weights and the weights a frame reads once
        (backbone layers, codebook 0's head, the projection, the codebook heads), so that they pass through L2
        without evicting the rest."""
        model = self.model
        small, mlp = model.decoder.l2_weights(self.max_batch)
        once_small, once_mlp = model.backbone.l2_weights(self.max_batch)
        heads = [model.codebook0_head.weight, model.projection.weight]
        heads += list(self.audio_head_rows) if self.audio_head_rows is not None else []  # [V, dim] views
        return small, mlp + once_small + once_mlp + heads

    def prefill(self, slot: int, prompt: Prompt, params: SamplingParams, length: int | None = None,
                run: Callable[..., Tensor] | None = None) -> None:
        """One prompt into `slot` (`prefill_group` of one)."""
        self.prefill_group([(slot, prompt, params)], length, run)

    @torch.no_grad()
    def prefill_group(self, entries: list[tuple[int, Prompt, SamplingParams]], length: int | None = None,
                      run: Callable[..., Tensor] | None = None) -> None:
        """Run prompts through the backbone into their slots' cache rows, in one pass (variable length: outside the
        frame graph). `entries`: (slot, prompt, sampling params); an entry may repeat (same slot, same prompt: the
        same values written twice), which fills a group to the fixed size its graph was captured for.

        `length` pads every prompt with empty rows (the engine's length buckets on CUDA; default: the longest):
        causal attention keeps them out of every real row, and the cache positions they fill are rewritten by the
        frames that follow. `run` replaces `prefill_rows` (a captured graph of it)."""
        length = length or max(prompt.rows for _, prompt, _ in entries)
        columns = entries[0][1].tokens.shape[-1]
        tokens = torch.zeros(len(entries), length, columns, dtype=torch.long)  # [G, L, 33]
        mask = torch.zeros(len(entries), length, columns, dtype=torch.bool)
        for i, (_, prompt, _) in enumerate(entries):
            tokens[i, : prompt.rows], mask[i, : prompt.rows] = prompt.tokens, prompt.mask
        slots_and_last = torch.tensor([[slot for slot, _, _ in entries], [p.rows - 1 for _, p, _ in entries]])  # [2, G]
        # Each slot's state is written once (an entry may repeat): its group row, slot, position and settings.
        first: dict[int, tuple[int, int, Prompt, SamplingParams]] = {}  # by slot: its first entry
        for i, (slot, prompt, params) in enumerate(entries):
            first.setdefault(slot, (i, slot, prompt, params))
        rows = list(first.values())
        settings = torch.tensor([[i for i, _, _, _ in rows], [slot for _, slot, _, _ in rows],
                                 [prompt.rows for _, _, prompt, _ in rows], [params.topk for *_, params in rows],
                                 [params.seed & 0x7FFF_FFFF_FFFF_FFFF for *_, params in rows]])  # [5, n]
        temperature = torch.tensor([params.temperature for *_, params in rows], dtype=torch.float32)  # [n]
        # Copied without blocking: a blocking copy waits for the stream to drain, so the GPU would idle while the
        # host prepares each group. From pageable memory the driver stages the bytes before the call returns.
        to_device = dict(device=self.device, non_blocking=True)
        hidden = (run or self.prefill_rows)(tokens.to(**to_device), mask.to(**to_device),
                                            slots_and_last.to(**to_device))  # [G, dim]
        group_rows, slots, positions, topk, seed = settings.to(**to_device)
        self.hidden.index_copy_(0, slots, hidden.index_select(0, group_rows))
        self.positions.index_copy_(0, slots, positions)
        self.frame_index.index_fill_(0, slots, 0)
        self.temperature.index_copy_(0, slots, temperature.to(**to_device))
        self.topk.index_copy_(0, slots, topk)
        self.seed.index_copy_(0, slots, seed)

    def prefill_rows(self, tokens: Tensor, mask: Tensor, slots_and_last: Tensor) -> Tensor:
        """Prompt rows `tokens, mask [G, L, 33]` into the cache rows of slots `slots_and_last[0]`; returns the
        hidden states `[G, dim]` of rows `slots_and_last[1]`. Fixed shapes, no host sync: capturable per (G, L)."""
        if self.fused:  # one kernel, summed as a generated frame's row is (`kernels.embed_sum`)
            from csmcli import kernels

            g, length, columns = tokens.shape  # [G, L, 33] -> G * L rows
            m = self.model
            embeds = kernels.embed_sum(m.audio_embeddings.weight, tokens.view(-1, columns), m.cfg.audio_vocab_size,
                                       mask.view(-1, columns), m.text_embeddings.weight).view(g, length, -1)
        else:
            embeds = self.model.embed_rows(tokens, mask)
        embeds = embeds.to(self.dtype)
        # Only the last prompt row's state is wanted: the last layer skips the other rows' attention and MLP.
        return self.model.backbone(embeds, 0, self.caches.backbone, slots_and_last[0], self.fused,
                                   last=slots_and_last[1])[:, 0]  # [G, dim]

    def state(self) -> list[Tensor]:
        """The per-slot tensors a step reads and advances (KV caches aside: a step writes only ahead of them)."""
        return [self.hidden, self.positions, self.frame_index, self.codes]

    def frame_sampling(self, n: int | None = None) -> FrameSampling:
        """The first `n` slots' (default all) sampling settings and noise for this frame."""
        n = n or self.max_batch
        args = (self.temperature[:n], self.topk[:n], self.seed[:n], self.frame_index[:n],
                self.model.cfg.num_codebooks, self.token_keys)
        if self.fused:  # the noise in one kernel instead of ~60 small ones
            from csmcli import kernels

            return frame_sampling(*args, noise=kernels.gumbel_noise)
        return frame_sampling(*args)

    @torch.no_grad()
    def decode(self, n: int | None = None) -> Tensor:
        """The first `n` slots' (default all) frames from their pending hidden states: codebook 0 and the depth
        decoder's 31 codebooks, `codes [n, 32]`."""
        n = n or self.max_batch
        settings = self.frame_sampling(n)
        caches = self.caches.decoder if n == self.max_batch else self.caches.head(n).decoder
        if self.fused:
            from csmcli import kernels

            last = self.model.cfg.num_codebooks - 1

            def draw_fused(logits: Tensor, codebook: int) -> tuple[Tensor, Tensor | None]:
                return kernels.sample(logits, settings.temperature, settings.kth, settings.gumbel[:, codebook],
                                      self.code_inputs if codebook < last else None,
                                      codebook * self.model.cfg.audio_vocab_size)

            return self.model.decode_frame_fused(self.hidden[:n], draw_fused, caches, self.audio_head_rows,
                                                 self.max_batch, self.heads_folded)

        def draw(logits: Tensor, codebook: int) -> Tensor:
            return sample(logits.float(), settings, codebook)

        return self.model.decode_frame(self.hidden[:n], draw, caches)

    @torch.no_grad()
    def advance(self, codes: Tensor) -> None:
        """Feed each of the first `len(codes)` slots its frame `codes [n, 32]` through the backbone: their next
        hidden states, positions + 1."""
        n = len(codes)
        # Clamped so finished or idle slots never write past the cache; their outputs are ignored.
        positions = self.positions[:n].clamp(max=self.max_seq_len - 1)  # [n]
        backbone = self.model.backbone
        caches = self.caches.backbone if n == self.max_batch else self.caches.head(n).backbone
        if self.fused:
            from csmcli import kernels

            embeds = kernels.embed_sum(self.model.audio_embeddings.weight, codes, self.model.cfg.audio_vocab_size)
            self.hidden[:n] = backbone.norm(backbone.step(embeds, positions, caches, self.max_batch,
                                                             l2_hint=True)[0])
        else:
            self.hidden[:n] = backbone(self.model.embed_frame(codes), positions[:, None], caches)[:, -1]
        self.positions[:n] += 1
        self.frame_index[:n] += 1

    @torch.no_grad()
    def step(self, n: int | None = None) -> Tensor:
        """One frame for the first `n` slots (default all): depth-decode the pending hidden states, then feed the
        frames to the backbone. Slots from `n` on are left as they are (the engine runs fewer rows while only
        low slots are busy).

        Returns the static `codes [B, 32]` buffer (rows below `n` overwritten; all of it by the next step)."""
        codes = self.decode(n)
        self.advance(codes)
        self.codes[: len(codes)] = codes
        return self.codes


def is_eos(codes: Tensor) -> Tensor:
    """An all-zero frame ends the utterance. `codes [..., 32]` -> `[...]` bool."""
    return (codes == 0).all(dim=-1)


@dataclass
class FrameChunk:
    """Frames made since the last chunk. `codes [n, 32]` on the CPU; `stop` is set on the last chunk."""

    index: int
    codes: Tensor
    generate_seconds: float
    stop: str | None = None  # "eos" | "max_frames" | "cancelled"
