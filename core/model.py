"""The decoder stack and its heads: embed -> blocks -> norm -> head.

Module paths follow transformers (`model.layers.N.self_attn.q_proj`, `lm_head`, ...) so checkpoints
load with an identity key map.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .errors import InputError
from .layers import DecoderLayer, Embedding, Linear, RMSNorm, RotaryEmbedding, compute_dtype
from .masks import layer_type_masks


class KVCache:
    """Preallocated keys/values, one [B, H_kv, S_max, D] pair per layer, written by position.

    `length` is the number of slots filled; the model advances it after each forward, and
    `truncate(n)` rolls it back (chat undo / regenerate) without touching memory.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device="cpu"):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def grow(self, max_len: int) -> None:
        """Reallocate to hold `max_len` slots, keeping what is cached."""
        if max_len <= self.max_len:
            return
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                bigger = t.new_zeros(t.shape[0], t.shape[1], max_len, t.shape[3])
                bigger[:, :, : self.length] = t[:, :, : self.length]
                store[i] = bigger
        self.max_len = max_len


class DecoderModel(nn.Module):
    native_step = True  # one-token decode through core.decode_step where it can run (False: the layers always)
    native_step_off = "switched off"  # why, when native_step is False

    def __init__(self, config: ModelConfig, fused: bool = False):
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i, fused) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> hidden states [B, T, C].

        cache: new keys go to slots [cache.length, cache.length + T) and the cache advances.
        attention_mask: [B, cache.length + T] with 1/True for real tokens (left padding), as in HF.
        position_ids: [B, T]; default is the slot index.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        kv_len = start + T
        if cache is not None and kv_len > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens, {kv_len} needed")
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(start, kv_len, device=device).expand(B, T)
        weights = self.embed_tokens.weight
        x = self.embed_tokens(input_ids).to(compute_dtype(weights.dtype, weights.device))
        if self.config.embed_scale:
            # The reference rounds sqrt(hidden) to the activation dtype before multiplying.
            x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        out = None
        if T == 1 and B == 1 and cache is not None and attention_mask is None and x.dtype == torch.float32 and x.device.type == "cpu":
            step = self._decode_step()
            # All layers in one native call (core.decode_step); None: not here, or a cache it cannot use.
            out = step(x, cos, sin, cache, start) if step is not None else None
        if out is not None:
            x = out
        else:
            masks = self._masks(T, kv_len, start, attention_mask, device)
            for i, layer in enumerate(self.layers):
                kv = (cache.keys[i], cache.values[i]) if cache is not None else None
                x = layer(x, cos, sin, masks[layer.layer_type], kv, start)
        if cache is not None:
            cache.length = kv_len
        return self.norm(x)

    def _decode_step(self):
        """The native one-token step (core.decode_step) when it can run now, else None."""
        if not self.native_step or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None  # it records no autograd graph; compiled graphs trace the layers
        from .layers import native_matvec

        mv = native_matvec()
        built = self.__dict__.get("_native_step")
        if built is None or built[0] is not mv:
            from . import decode_step

            built = (mv, *decode_step.build(self))
            self.__dict__["_native_step"] = built
        return built[1]

    def decode_path(self) -> str:
        """What runs one-token decode: decode_step.STEP, or 'PyTorch layers: <why>'."""
        if not self.native_step:
            return f"PyTorch layers: {self.native_step_off}"
        with torch.inference_mode():
            self._decode_step()
        return self.__dict__["_native_step"][2]

    def reset_decode_step(self) -> None:
        """Forget the built decode step: call after replacing layers or weights (it points at their tensors)."""
        self.__dict__.pop("_native_step", None)

    def _apply(self, fn, recurse=True):
        self.reset_decode_step()  # .to() / .half() / ... may move or replace the tensors it points to
        return super()._apply(fn, recurse)

    def _masks(self, T, kv_len, start, attention_mask, device) -> dict[str, torch.Tensor | None]:
        cfg = self.config
        window = cfg.sliding_window
        # None lets attention take its fast path: plain causal prefill, or one token seeing all it may.
        needs_window = window is not None and kv_len > window
        if attention_mask is None and not needs_window and (start == 0 or T == 1):
            return dict.fromkeys(cfg.layer_types)
        padding = attention_mask.bool() if attention_mask is not None else None
        masks = layer_type_masks(cfg.layer_types, window, T, kv_len, q_offset=start, padding_mask=padding, device=device)
        if padding is not None:
            # A padded query row may see no key at all; let it see itself so softmax stays finite.
            # Its output is never used (padding stays masked as a key for every real token).
            eye = torch.zeros(T, kv_len, dtype=torch.bool, device=device)
            eye[torch.arange(T), torch.arange(start, kv_len)] = True
            masks = {t: m | (eye & ~m.any(-1, keepdim=True)) for t, m in masks.items()}
        return masks


class CausalLM(nn.Module):
    """Decoder + language-model head (HF `*ForCausalLM`)."""

    def __init__(self, config: ModelConfig, fused: bool = False):
        """fused: q/k/v and gate/up stacked into one projection each (inference layout; the
        checkpoint names stay loadable, see loading.assign_weights)."""
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, fused)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] ([B, 1, V] with last_only: prefill skips T-1 head matmuls)."""
        h = self.model(input_ids, cache=cache, position_ids=position_ids, attention_mask=attention_mask)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(h)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, dtype=compute_dtype(p.dtype, p.device), device=p.device)


class _EncoderHead(nn.Module):
    """Shared base of the non-generative heads: a decoder under `base_prefix` and one Linear on top.

    HF keeps the decoder under `model` for these heads except LlamaForQuestionAnswering, which
    keeps `transformer` for backward compatibility; the attribute name *is* the checkpoint key prefix.
    """

    base_prefix = "model"

    def __init__(self, config: ModelConfig, fused: bool = False):
        super().__init__()
        self.config = config
        setattr(self, self.base_prefix, DecoderModel(config, fused))

    @property
    def decoder(self) -> DecoderModel:
        return getattr(self, self.base_prefix)

    def hidden(self, input_ids: torch.Tensor, decoder_kw: dict) -> torch.Tensor:
        """Final hidden states [B, T, C]; decoder_kw: cache / position_ids / attention_mask, as DecoderModel takes."""
        return self.decoder(input_ids, **decoder_kw)


class SequenceClassification(_EncoderHead):
    """HF `*ForSequenceClassification`: `score` (no bias) on the last non-padding token."""

    def __init__(self, config: ModelConfig, fused: bool = False):
        super().__init__(config, fused)
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

    def __init__(self, config: ModelConfig, fused: bool = False):
        super().__init__(config, fused)
        bias = bool(config.raw.get("token_classification_bias", True))
        self.score = Linear(config.hidden_size, config.num_labels, bias=bias)

    def forward(self, input_ids: torch.Tensor, **decoder_kw) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, num_labels]."""
        return self.score(self.hidden(input_ids, decoder_kw))


class QuestionAnswering(_EncoderHead):
    """HF `LlamaForQuestionAnswering`: `qa_outputs` Linear(hidden, 2) -> start and end logits."""

    base_prefix = "transformer"

    def __init__(self, config: ModelConfig, fused: bool = False):
        super().__init__(config, fused)
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
}


def decode_path(model: nn.Module) -> str:
    """How `model` (any head) runs one-token decode: decode_step.STEP, or 'PyTorch layers: <why>'."""
    decoder = next((m for m in model.modules() if isinstance(m, DecoderModel)), None)
    return decoder.decode_path() if decoder is not None else "no decoder"
