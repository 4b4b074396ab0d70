"""Parity with transformers through OUR loader: tiny random checkpoints saved with save_pretrained."""

import pytest
import torch

from llm_torch.core.placement.loading import ResolvedModel, load_resolved
from tests.tiny import GEMMA2_BASE, GEMMA2_VARIANTS, LLAMA_BASE, LLAMA_VARIANTS, config_dict, hf_model

CASES = [("llama-" + k, config_dict(LLAMA_BASE, v)) for k, v in LLAMA_VARIANTS.items()] + [
    ("gemma2-" + k, config_dict(GEMMA2_BASE, v)) for k, v in GEMMA2_VARIANTS.items()
]
LOGIT_TOL = 1e-4


def load_ours(folder):
    return load_resolved(ResolvedModel("tiny", "folder", folder), dtype="float32", with_tokenizer=False).model


def greedy(model, ids, steps):
    """Prefill, then one token at a time through the KV cache."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    logits = model(ids, cache=cache, last_only=True)
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache=cache)
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def pair(request, tmp_path_factory):
    name, cfg = request.param
    ref = hf_model(cfg)
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder)
    return name, ref, load_ours(folder)


def test_module_names_are_transformers(pair):
    """The loaded model is the plain reference: transformers' module tree, tensor for tensor (no fused layout)."""
    name, ref, ours = pair
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@torch.no_grad()
def test_logits_match(pair):
    name, ref, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (2, 24))  # longer than the Gemma 2 window (6) and the dynamic-rope context (16)
    expected = ref(ids).logits
    got = ours(ids)
    diff = (expected - got).abs().max().item()
    assert diff < LOGIT_TOL, f"{name}: max abs logit difference {diff:.2e}"
    assert expected.std() > 0.05  # the check is not vacuous


@torch.no_grad()
def test_greedy_tokens_match(pair):
    name, ref, ours = pair
    torch.manual_seed(2)
    ids = torch.randint(3, 256, (1, 8))
    ref.generation_config.eos_token_id = None
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)[:, ids.shape[1] :]
    got = greedy(ours, ids, 32)
    assert got.tolist() == expected.tolist()


def reference_incremental(ref, ids, cuts):
    """The reference through its own KV cache, fed ids[:, a:b] for consecutive cuts."""
    from transformers import DynamicCache

    past, steps = DynamicCache(config=ref.config), []
    for a, b in zip(cuts, cuts[1:]):
        steps.append(ref(ids[:, a:b], cache=past, use_cache=True).logits)  # the cache fills in place
    return torch.cat(steps, dim=1)


@torch.no_grad()
def test_incremental_decode_equals_full_forward(pair):
    """Dynamic NTK changes the frequencies with the length (here past max_position_embeddings 16) while cached
    keys keep theirs, in the reference too: there incremental decode cannot equal one forward, so it is held
    to the reference's own incremental decode over the same cuts instead."""
    name, ref, ours = pair
    torch.manual_seed(3)
    ids = torch.randint(3, 256, (2, 20))
    cuts = [0, 7, 12, *range(13, 21)]  # prefill past nothing, then chunk + single steps
    if ours.config.rope_parameters["rope_type"] == "dynamic":
        full = reference_incremental(ref, ids, cuts)
        assert (full - ref(ids).logits)[:, 16:].abs().max().item() > 1e-3  # the comparison below is not vacuous
    else:
        full = ours(ids)
    cache = ours.new_cache(2, 20)
    steps = [ours(ids[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:])]
    incremental = torch.cat(steps, dim=1)
    assert (full - incremental).abs().max().item() < LOGIT_TOL  # fp32 rounding of a different op order
