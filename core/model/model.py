"""The decoder stack and its heads: embed -> blocks -> norm -> head.

Module paths follow transformers (`model.layers.N.self_attn.q_proj`, `lm_head`, ...) so checkpoints
load with an identity key map.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .config import ModelConfig
from llm_torch.core.errors import InputError
from .kv_cache import KVCache, resolve_format
from .layers import DecoderLayer, Embedding, Linear, RMSNorm, RotaryEmbedding, compute_dtype
from .masks import layer_type_masks, mask_from_positions


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.rotary_emb = RotaryEmbedding(config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> embeddings [B, T, C] in the activation dtype."""
        weights = self.embed_tokens.weight
        x = self.embed_tokens(input_ids).to(compute_dtype(weights.dtype, weights.device))
        if self.config.embed_scale:
            # The reference rounds sqrt(hidden) to the activation dtype before multiplying.
            x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        slots: Sequence[int] | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rope_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> hidden states [B, T, C].

        cache: row b continues the sequence in cache slot slots[b] (default: slot b): its T new keys go to
        positions lengths[slot] .. + T - 1, which then advance.
        attention_mask: [B, T] with 1/True for real tokens (left padding, as in HF), without a cache.
        position_ids: [B, T]; default: each row's positions.
        rope_lengths: per row, the sequence length dynamic NTK rope scales for (RotaryEmbedding.forward's
        lengths; default: the row's last position + 1).
        """
        B, T = input_ids.shape
        device = input_ids.device
        x = self.embed(input_ids)
        if cache is None:
            if position_ids is None:
                position_ids = torch.arange(T, device=device).expand(B, T)
            cos, sin = self.rotary_emb(position_ids, x.dtype, rope_lengths)
            masks = self._masks_without_cache(T, attention_mask, device)
            for layer in self.layers:
                x = layer(x, cos, sin, masks[layer.layer_type], None)
            return self.norm(x)
        slots = list(range(B)) if slots is None else list(slots)
        if len(slots) != B or len(set(slots)) != B:
            raise ValueError(f"{B} rows need {B} distinct cache slots, got {slots}")
        starts = [cache.lengths[s] for s in slots]
        cache.ensure(max(starts) + T)
        if position_ids is None:
            position_ids = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
        cos, sin = self.rotary_emb(position_ids, x.dtype, rope_lengths)
        ends = [s + T for s in starts]
        masks = self._cache_masks(cache, slots, ends, position_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks[i], CacheLayer(cache, i, slots, starts, ends))
        for s, e in zip(slots, ends):
            cache.lengths[s] = e
        return self.norm(x)

    def _cache_masks(self, cache: KVCache, slots, ends, position_ids) -> list[torch.Tensor | None]:
        """Per layer, the mask over the keys CacheLayer.update returns (from the one mask builder), or None
        where attention can take its fast path: one row whose keys all count (causal among the new ones)."""
        cfg, T = self.config, position_ids.shape[1]
        by_kind: dict[tuple, torch.Tensor | None] = {}
        out = []
        for i in range(cfg.num_hidden_layers):
            window = cache.windows[i]
            cap = cache.layer_cap(i)
            kind = (window, cap)
            if kind not in by_kind:
                simple = len(slots) == 1 and ends[0] <= cap and (window is None or ends[0] <= window)
                if simple and (T == 1 or ends[0] == T):
                    by_kind[kind] = None
                else:
                    k_pos = cache.key_positions(i, slots, ends)
                    by_kind[kind] = mask_from_positions(position_ids, k_pos, window)
            out.append(by_kind[kind])
        return out

    def _masks_without_cache(self, T, attention_mask, device) -> dict[str, torch.Tensor | None]:
        cfg = self.config
        window = cfg.sliding_window
        # None lets attention take its fast path: plain causal attention over the T tokens.
        if attention_mask is None and (window is None or T <= window):
            return dict.fromkeys(cfg.layer_types)
        padding = attention_mask.bool() if attention_mask is not None else None
        masks = layer_type_masks(cfg.layer_types, window, T, T, padding_mask=padding, device=device)
        if padding is not None:
            # A padded query row may see no key at all; let it see itself so softmax stays finite.
            # Its output is never used (padding stays masked as a key for every real token).
            eye = torch.eye(T, dtype=torch.bool, device=device)
            masks = {t: m | (eye & ~m.any(-1, keepdim=True)) for t, m in masks.items()}
        return masks


class CacheLayer:
    """One layer's view of the cache for one forward: what Attention writes its new keys to and reads from."""

    __slots__ = ("cache", "layer", "slots", "starts", "ends")

    def __init__(self, cache: KVCache, layer: int, slots: list[int], starts: list[int], ends: list[int]):
        self.cache, self.layer, self.slots, self.starts, self.ends = cache, layer, slots, starts, ends

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, H_kv, T, D] -> every key and value each row attends over [B, H_kv, S, D]."""
        self.cache.write(self.layer, self.slots, self.starts, k, v)
        return self.cache.read(self.layer, self.slots, self.ends)


class CausalLM(nn.Module):
    """Decoder + language-model head (HF `*ForCausalLM`)."""

    kv_cache = "auto"  # --kv-cache (kv_cache.CHOICES); the loader sets it on the instance

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        slots: Sequence[int] | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
        rope_lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] ([B, 1, V] with last_only: prefill skips T-1 head matmuls)."""
        h = self.model(input_ids, cache=cache, slots=slots, position_ids=position_ids, attention_mask=attention_mask,
                       rope_lengths=rope_lengths)
        if last_only:
            h = h[:, -1:]
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., C] -> logits [..., V] (soft-capped where the config says so)."""
        logits = self.lm_head(h)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def kv_format(self) -> str:
        """What this model's KV cache stores: `kv_cache` (the --kv-cache choice, set by the loader) resolved
        for its weights: a projection that is not a plain float Linear counts as quantized."""
        q = self.model.layers[0].self_attn.q_proj
        quantized = type(q) is not Linear or not q.weight.is_floating_point()
        p = self.lm_head.weight
        return resolve_format(self.kv_cache, q.weight.dtype if not quantized else p.dtype, p.device, quantized)

    def new_cache(self, batch_size: int, max_len: int, **kw) -> KVCache:
        """A cache of `batch_size` slots of `max_len` positions read in the activation dtype, stored as
        kv_format() says (kv_cache.KVCache kw)."""
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, dtype=compute_dtype(p.dtype, p.device), device=p.device,
                       kv_format=self.kv_format(), **kw)


class _EncoderHead(nn.Module):
    """Shared base of the non-generative heads: a decoder under `base_prefix` and one Linear on top.

    HF keeps the decoder under `model` for these heads except LlamaForQuestionAnswering, which
    keeps `transformer` for backward compatibility; the attribute name *is* the checkpoint key prefix.
    """

    base_prefix = "model"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        setattr(self, self.base_prefix, DecoderModel(config))

    @property
    def decoder(self) -> DecoderModel:
        return getattr(self, self.base_prefix)

    def hidden(self, input_ids: torch.Tensor, decoder_kw: dict) -> torch.Tensor:
        """Final hidden states [B, T, C]; decoder_kw: cache / position_ids / attention_mask, as DecoderModel takes."""
        return self.decoder(input_ids, **decoder_kw)


class SequenceClassification(_EncoderHead):
    """HF `*ForSequenceClassification`: `score` (no bias) on the last non-padding token."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, **decoder_kw) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, num_labels]."""
        h = self.hidden(input_ids, decoder_kw)
        B, T = input_ids.shape
        pad = self.config.pad_token_id
        if pad is None:
            if B != 1:
                # Without a pad id the last real token cannot be found in a padded batch (as in HF).
                raise InputError(
                    "cannot classify a batch of more than one input: the model config has no pad_token_id",
                    hint="use --batch-size 1, or set pad_token_id in config.json",
                )
            last = torch.full((B,), T - 1, device=input_ids.device)
        else:
            # The rightmost token that is not the pad id, as HF does: works for left and right padding
            # (and a sequence of only pads picks position 0).
            idx = torch.arange(T, device=input_ids.device)
            last = (idx * (input_ids != pad)).argmax(-1)
        pooled = h[torch.arange(B, device=h.device), last]
        return self.score(pooled)


class TokenClassification(_EncoderHead):
    """HF `*ForTokenClassification`: `score` on every position (its dropout is a no-op at inference)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        bias = config.token_classification_bias
        self.score = Linear(config.hidden_size, config.num_labels, bias=bias)

    def forward(self, input_ids: torch.Tensor, **decoder_kw) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, num_labels]."""
        return self.score(self.hidden(input_ids, decoder_kw))


class QuestionAnswering(_EncoderHead):
    """HF `LlamaForQuestionAnswering`: `qa_outputs` Linear(hidden, 2) -> start and end logits."""

    base_prefix = "transformer"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.qa_outputs = Linear(config.hidden_size, 2, bias=True)

    def forward(self, input_ids: torch.Tensor, **decoder_kw) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] -> (start_logits [B, T], end_logits [B, T])."""
        logits = self.qa_outputs(self.hidden(input_ids, decoder_kw))
        start, end = logits.unbind(-1)
        return start.contiguous(), end.contiguous()


HEADS = {
    "causal_lm": CausalLM,
    "sequence_classification": SequenceClassification,
    "token_classification": TokenClassification,
    "question_answering": QuestionAnswering,
    # No head: the final hidden state (transformers' LlamaModel / Gemma2Model), for `llm embed`.
    "feature_extraction": DecoderModel,
}
