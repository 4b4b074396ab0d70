"""Parity of the non-generative heads against transformers on tiny random configs (fp32, 1e-4)."""

from __future__ import annotations

import pytest
import torch

from llm_torch.core.errors import InputError
from llm_torch.core.placement.loading import ResolvedModel, load_resolved
from llm_torch.core.model.model import QuestionAnswering, SequenceClassification, TokenClassification

from tests.tiny import GEMMA2_BASE, LLAMA_BASE, config_dict

LABELS = {0: "neg", 1: "neu", 2: "pos"}

CASES = [
    ("llama", LLAMA_BASE, "LlamaForSequenceClassification", "AutoModelForSequenceClassification", SequenceClassification),
    ("llama", LLAMA_BASE, "LlamaForTokenClassification", "AutoModelForTokenClassification", TokenClassification),
    ("llama", LLAMA_BASE, "LlamaForQuestionAnswering", "AutoModelForQuestionAnswering", QuestionAnswering),
    ("gemma2", GEMMA2_BASE, "Gemma2ForSequenceClassification", "AutoModelForSequenceClassification", SequenceClassification),
    ("gemma2", GEMMA2_BASE, "Gemma2ForTokenClassification", "AutoModelForTokenClassification", TokenClassification),
]


def head_reference(base: dict, arch: str, auto: str, seed: int = 0, **extra):
    """The transformers head model, with weights large enough that soft-caps and windows matter."""
    import transformers

    cfg = config_dict(base, dict(architectures=[arch], id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **extra))
    config = transformers.AutoConfig.for_model(**cfg)
    if cfg["model_type"] == "gemma2":
        config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, auto).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1).add_(0 if cfg["model_type"] == "gemma2" else 1.0)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def hf_out(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    if hasattr(out, "start_logits"):
        return out.start_logits, out.end_logits
    return (out.logits,)


def ours_out(model, ids, mask=None):
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    return out if isinstance(out, tuple) else (out,)


def close(a, b, tol=1e-4):
    return all(torch.allclose(x, y, atol=tol, rtol=0) for x, y in zip(a, b, strict=True))


def maxdiff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("family", "base", "arch", "auto", "cls"), CASES, ids=[c[2] for c in CASES])
def test_head_parity(tmp_path, family, base, arch, auto, cls):
    ref = head_reference(base, arch, auto)
    ref.save_pretrained(tmp_path)
    loaded = load_resolved(ResolvedModel("t", "folder", tmp_path), dtype="float32", with_tokenizer=False)
    model = loaded.model
    assert isinstance(model, cls)
    assert loaded.config.id2label == LABELS

    torch.manual_seed(1)
    # Ids >= 3 so no pad (0) appears inside a sequence; 12 tokens exceed the Gemma 2 window (6).
    ids = torch.randint(3, base["vocab_size"], (1, 12))
    ref_out, our_out = hf_out(ref, ids), ours_out(model, ids)
    assert close(ref_out, our_out), maxdiff(ref_out, our_out)

    # A left-padded batch with its mask matches each sequence run alone (and the reference's batch).
    lengths = [12, 7, 3]
    pad = base["pad_token_id"]
    batch = torch.full((3, 12), pad)
    mask = torch.zeros(3, 12, dtype=torch.long)
    seqs = [torch.randint(3, base["vocab_size"], (n,)) for n in lengths]
    for i, s in enumerate(seqs):
        batch[i, 12 - len(s):] = s
        mask[i, 12 - len(s):] = 1
    ours_b = ours_out(model, batch, mask)
    for i, s in enumerate(seqs):
        alone = ours_out(model, s[None])
        n = len(s)
        if cls is SequenceClassification:
            got = tuple(t[i : i + 1] for t in ours_b)
        else:  # per-token outputs: compare the real (unpadded) positions
            got = tuple(t[i : i + 1, 12 - n :] for t in ours_b)
        assert close(got, alone), (i, maxdiff(got, alone))
    if cls is SequenceClassification:
        ref_b = hf_out(ref, batch, mask)
        assert close(ref_b, ours_b), maxdiff(ref_b, ours_b)


def test_sequence_classification_needs_pad_for_batches(tmp_path):
    ref = head_reference(LLAMA_BASE, "LlamaForSequenceClassification", "AutoModelForSequenceClassification", pad_token_id=None)
    ref.save_pretrained(tmp_path)
    model = load_resolved(ResolvedModel("t", "folder", tmp_path), dtype="float32", with_tokenizer=False).model
    ids = torch.randint(3, 256, (2, 5))
    with pytest.raises(InputError, match="pad_token_id"):
        model(ids)
    # A single sequence needs no pad id: the last position is the last token.
    ref_out, our_out = hf_out(ref, ids[:1]), ours_out(model, ids[:1])
    assert close(ref_out, our_out)


def test_qa_checkpoint_uses_transformer_prefix(tmp_path):
    ref = head_reference(LLAMA_BASE, "LlamaForQuestionAnswering", "AutoModelForQuestionAnswering")
    keys = set(ref.state_dict())
    assert "qa_outputs.weight" in keys and "qa_outputs.bias" in keys
    assert any(k.startswith("transformer.layers.") for k in keys)
