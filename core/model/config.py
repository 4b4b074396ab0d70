"""One behavioural model config, built from a checkpoint's config.json (HF field names).

Fields name behaviour (embed_scale, norm_unit_offset, sandwich_norms, softcaps, sliding windows),
never families: a family module only supplies defaults and flag values for its `model_type`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_torch.core.errors import ConfigError, InputError, UnsupportedError
from .bounds import LIMITS, MAX_ROPE_FACTOR, bounded_float, bounded_int, check_sizes

# hidden_act (HF name) -> the function it names; layers.py and native_step.py map these functions to code.
# gelu_new and gelu_pytorch_tanh are both the tanh approximation of GELU.
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Keys each rope type needs beyond rope_theta (the reference raises on a missing one too).
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    rope_parameters: dict[str, Any] = field(hash=False)
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Behaviour flags (set by the family, never tested by family name in the layers).
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the activation dtype
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), computed in fp32
    sandwich_norms: bool = False  # norms after attention/MLP outputs too (4 per block)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 instead of head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the checkpoint's own dtype name ("bfloat16", ...)
    id2label: dict[int, str] = field(default_factory=dict, hash=False)
    problem_type: str | None = None  # sequence classification: single/multi_label_classification, regression
    token_classification_bias: bool = True  # the token-classification head's Linear has a bias
    quantization_config: dict[str, Any] | None = field(default=None, hash=False)  # our quantized folders (quant/)
    # The config.json as read, for writing it back out (quantize, convert); layers read the fields above.
    raw: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    @property
    def activation(self) -> str:
        """The function hidden_act names (ACTIVATIONS): what layers.py and native_step.py compute."""
        return ACTIVATIONS[self.hidden_act]

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def num_labels(self) -> int:
        return len(self.id2label) or 2

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict, applying the family's defaults and behaviour flags."""
        from .families import family_for

        if not isinstance(raw, dict):
            raise ConfigError("config is not a JSON object")
        model_type = raw.get("model_type")
        if not model_type:
            raise ConfigError("config.json has no 'model_type'", hint="is this a Hugging Face model folder?")
        if not isinstance(model_type, str):
            raise ConfigError(f"config.json model_type = {model_type!r} is not a string")
        family = family_for(model_type)
        # An explicit null in config.json (e.g. final_logit_softcapping) disables the option, so it overrides defaults.
        merged = {**family.defaults, **raw}
        # Before normalize and _build, which build per-layer lists: an absurd size is an error, not a hang.
        check_sizes(merged)
        try:
            return cls._build(family.normalize(merged), family.flags)
        except KeyError as e:
            raise ConfigError(f"config.json for model_type '{model_type}' lacks required field {e}") from None
        except (TypeError, ValueError, OverflowError, AttributeError) as e:
            raise ConfigError(f"config.json for model_type '{model_type}' has a bad value: {e}") from None

    @classmethod
    def _build(cls, c: dict[str, Any], flags: dict[str, Any]) -> ModelConfig:
        heads = bounded_int("num_attention_heads", c["num_attention_heads"])
        hidden = bounded_int("hidden_size", c["hidden_size"])
        kv_heads = bounded_int("num_key_value_heads", c.get("num_key_value_heads") or heads)
        head_dim = bounded_int("head_dim", c.get("head_dim") or hidden // heads)
        layers = bounded_int("num_hidden_layers", c["num_hidden_layers"])
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        act = c.get("hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise UnsupportedError(f"activation '{act}' is not supported", hint=f"supported: {', '.join(ACTIVATIONS)}")
        for key in ("use_bidirectional_attention",):
            if c.get(key):
                raise UnsupportedError(f"config option {key}={c[key]!r} is not supported")
        if c.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedError(f"partial_rotary_factor={c['partial_rotary_factor']} is not supported")

        sliding = c.get("sliding_window")
        sliding = bounded_int("sliding_window", sliding) if sliding else None
        layer_types = tuple(c.get("layer_types") or ("full_attention",) * layers)
        if len(layer_types) != layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries for {layers} layers")
        for t in layer_types:
            if t not in LAYER_TYPES:
                raise UnsupportedError(f"layer type '{t}' is not supported", hint=f"supported: {', '.join(LAYER_TYPES)}")
        if "sliding_attention" in layer_types and not sliding:
            raise ConfigError("layer_types asks for sliding attention but sliding_window is not set")

        eos = c.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
        id2label = {int(k): str(v) for k, v in (c.get("id2label") or {}).items()}
        dtype = c.get("dtype") or c.get("torch_dtype")
        archs = c.get("architectures") or ()
        config = cls(
            model_type=c["model_type"],
            architectures=tuple(archs),
            vocab_size=bounded_int("vocab_size", c["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=bounded_int("intermediate_size", c["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            hidden_act=act,
            max_position_embeddings=bounded_int("max_position_embeddings", c["max_position_embeddings"]),
            rms_norm_eps=float(c["rms_norm_eps"]),
            rope_parameters=_rope_parameters(c),
            attention_bias=bool(c.get("attention_bias", False)),
            mlp_bias=bool(c.get("mlp_bias", False)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            embed_scale=bool(flags.get("embed_scale", False)),
            norm_unit_offset=bool(flags.get("norm_unit_offset", False)),
            sandwich_norms=bool(flags.get("sandwich_norms", False)),
            query_pre_attn_scalar=_opt_float(c.get("query_pre_attn_scalar")) if flags.get("query_pre_attn_scalar") else None,
            attn_logit_softcapping=_opt_float(c.get("attn_logit_softcapping")),
            final_logit_softcapping=_opt_float(c.get("final_logit_softcapping")),
            sliding_window=sliding,
            layer_types=layer_types,
            bos_token_id=_opt_int(c.get("bos_token_id")),
            eos_token_ids=eos_ids,
            pad_token_id=_opt_int(c.get("pad_token_id")),
            torch_dtype=str(dtype) if dtype else None,
            id2label=id2label,
            problem_type=c.get("problem_type"),
            token_classification_bias=bool(c.get("token_classification_bias", True)),
            quantization_config=c.get("quantization_config"),
            raw=dict(c),
        )
        context, (_, most) = supported_context(config), LIMITS["max_position_embeddings"]
        if context > most:
            raise ConfigError(f"config.json rope scaling claims a context of {context} tokens, past the sane {most}",
                              hint="the rope factor or max_position_embeddings is corrupt; fix the value")
        return config


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """`<folder>/config.json` as it is written (ModelConfig.from_dict applies the family's defaults)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {folder}", hint="a model folder needs config.json next to its weights")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def describe_quantization(qconfig: dict[str, Any]) -> str:
    """What a `quantization_config` says, for people: 'torchao Int8WeightOnlyConfig', 'bitsandbytes nf4'.
    Plain reading of the dict: no quantization library is needed to name what a checkpoint holds."""
    kind = ((qconfig.get("quant_type") or {}).get("default") or {}).get("_type")  # torchao's config class
    if kind is None and qconfig.get("load_in_4bit"):
        kind = qconfig.get("bnb_4bit_quant_type", "4-bit")
    elif kind is None and qconfig.get("load_in_8bit"):
        kind = "LLM.int8"
    return " ".join(filter(None, (qconfig.get("quant_method", "?"), kind)))


def _rope_parameters(c: dict[str, Any]) -> dict[str, Any]:
    """Normalise `rope_parameters` (transformers v5) or legacy `rope_theta` + `rope_scaling` into one dict."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and params:
        params = dict(params)
    else:
        params = dict(c.get("rope_scaling") or {})
    # Legacy configs say "type"; both spellings are accepted by the reference.
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", float(c.get("rope_theta") or 10000.0))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedError(f"rope type '{rope_type}' is not supported", hint=f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    for key in _ROPE_REQUIRED.get(rope_type, ()):
        if params.get(key) is None:
            raise ConfigError(f"rope type '{rope_type}' needs '{key}' in rope_parameters/rope_scaling")
    if rope_type == "yarn":
        params.setdefault("original_max_position_embeddings", int(c["max_position_embeddings"]))
    _check_rope(params)
    return params


def _check_rope(params: dict[str, Any]) -> None:
    """The rope numbers within sane bounds, so supported_context and the frequency tables stay finite."""
    where = "config.json rope_parameters"
    bounded_float("rope_theta", params["rope_theta"], where, 0.0, 1e12)
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if params.get(key) is not None:
            bounded_float(key, params[key], where, 0.0, MAX_ROPE_FACTOR)
    if params.get("original_max_position_embeddings") is not None:
        bounded_int("original_max_position_embeddings", params["original_max_position_embeddings"], where)


def supported_context(config: ModelConfig) -> int:
    """The longest context (prompt + generated tokens) the model's rope setup supports, as vLLM derives
    max_model_len from config.json:
    - no scaling: max_position_embeddings, the trained length (plain rope past it is out of distribution);
    - linear, dynamic (NTK): factor x max_position_embeddings (transformers documents factor as "handles
      sequences of factor x the original length"; dynamic NTK's frequencies adapt to any length, but the
      factor is how far the checkpoint claims to go);
    - yarn: factor x original_max_position_embeddings (which defaults to max_position_embeddings);
    - llama3: max_position_embeddings (Llama 3.1 states the extended 131072 there, the original 8192 in
      rope_scaling).
    Never below max_position_embeddings."""
    p = config.rope_parameters
    trained = config.max_position_embeddings
    rope_type = p["rope_type"]
    if rope_type in ("linear", "dynamic"):
        return max(trained, int(float(p["factor"]) * trained))
    if rope_type == "yarn":
        return max(trained, int(float(p["factor"]) * int(p["original_max_position_embeddings"])))
    return trained


def resolve_context(config: ModelConfig, requested: int | None, what: str = "a context") -> int:
    """The context to use: `requested` (None: supported_context), or InputError when the rope setup does
    not support that many positions (never a silent clamp); `what` names it in the message."""
    limit = supported_context(config)
    if requested is None:
        return limit
    if requested > limit:
        p = config.rope_parameters
        if p["rope_type"] == "default":
            why = f"max_position_embeddings {config.max_position_embeddings}, no rope_scaling"
            more = ('; going further needs rope_scaling in config.json, e.g. {"rope_type": "dynamic", "factor": '
                    f'{-(-requested // config.max_position_embeddings)}.0}} (dynamic NTK)')
        else:
            why = f"rope_scaling {p['rope_type']} with factor {p.get('factor')}"
            more = ""
        raise InputError(f"{what} of {requested} tokens is longer than the model supports ({limit}: {why})",
                         hint=f"use --context {limit} or less{more}")
    return requested


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _opt_int(v: Any) -> int | None:
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return None if v is None else int(v)
