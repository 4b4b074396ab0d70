"""Long context: dynamic NTK rope (rope_scaling {"rope_type": "dynamic"}) past max_position_embeddings against
transformers, per sequence in a batch, through both runners and prefix reuse; the one rule saying how long
a context a rope setup supports, and its errors; the KV memory of Gemma 2's sliding layers at 8k."""

from __future__ import annotations

import pytest
import torch

from llm_torch.core.model.config import ModelConfig, resolve_context, supported_context
from llm_torch.core.engine.engine import Engine, EngineConfig
from llm_torch.core.errors import InputError
from llm_torch.core.engine.spec import GenerationSpec
from llm_torch.core.model.kv_cache import KVCache
from llm_torch.core.model.layers import rope_inv_freq
from llm_torch.core.placement.loading import ResolvedModel, load_resolved
from llm_torch.core.engine.runner import NATIVE, NativeRunner, Segment, TorchRunner, make_runner
from tests.tiny import LLAMA_BASE, config_dict, hf_model

TRAINED = 16  # max_position_embeddings of the tiny dynamic model: factor 2 supports 32
DYNAMIC = config_dict(LLAMA_BASE, dict(num_key_value_heads=2, max_position_embeddings=TRAINED,
                                       rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
LEGACY = config_dict(DYNAMIC, dict(rope_scaling={"type": "dynamic", "factor": 2.0}))  # transformers < 4.45 spelling


@pytest.fixture(scope="module", params=[DYNAMIC, LEGACY], ids=["rope_type", "legacy_type"])
def pair(request, tmp_path_factory):
    ref = hf_model(request.param)
    ref.generation_config.eos_token_id = None
    folder = tmp_path_factory.mktemp("dynamic")
    ref.save_pretrained(folder)
    ours = load_resolved(ResolvedModel("tiny", "folder", folder), dtype="float32", with_tokenizer=False).model
    assert ours.config.rope_parameters["rope_type"] == "dynamic"
    return ref, ours


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


@torch.no_grad()
def reference_generate(ref, prompt, n):
    # transformers' rotary module keeps the frequencies of the longest sequence it has seen until a forward
    # shorter than max_position_embeddings resets them: start every reference run from that state.
    ref(torch.tensor([prompt[:1]]))
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def runner_of(model, kind):
    if kind == "torch":
        return TorchRunner(model, "reference")
    runner = make_runner(model)
    if not isinstance(runner, NativeRunner):
        pytest.skip(f"native step unavailable: {runner.description}")
    assert runner.description == NATIVE  # dynamic NTK runs natively, no fallback
    return runner


def test_frequencies_are_the_references_bitwise():
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = AutoConfig.for_model(**DYNAMIC)
    config = ModelConfig.from_dict(DYNAMIC)
    for n in (1, TRAINED, TRAINED + 1, 23, 32, 1000):
        # transformers passes max(position_ids) + 1, an int64 tensor, once past its cached length
        expected = ROPE_INIT_FUNCTIONS["dynamic"](hf_config, "cpu", seq_len=torch.tensor(n))[0]
        got = rope_inv_freq(config, n)[0]
        assert torch.equal(got, expected), n
    unscaled = rope_inv_freq(config, TRAINED)[0]
    assert not torch.equal(rope_inv_freq(config, TRAINED + 1)[0], unscaled)


@torch.no_grad()
def test_full_forward_past_max_position_embeddings_matches_reference(pair):
    ref, ours = pair
    ids = torch.tensor([tokens(30, 1), tokens(30, 2)])  # 30 > 16 positions
    expected = ref(ids).logits
    got = ours(ids)
    assert (expected - got).abs().max().item() < 1e-5
    assert expected.std() > 0.05
    # Not vacuous: the unscaled frequencies give other logits past the trained length.
    plain = ours(ids, rope_lengths=[TRAINED, TRAINED])
    assert (plain - expected)[:, TRAINED:].abs().max().item() > 1e-3


@pytest.mark.parametrize("kind", ["native", "torch"])
@pytest.mark.parametrize("prompt_len,new", [(8, 20), (21, 10)], ids=["crosses", "starts_past"])
def test_greedy_generation_past_the_limit_matches_reference_generate(pair, kind, prompt_len, new):
    """A prompt that generation carries past 16 positions, and one already past it prefilled in chunks of 5
    (each chunk rotated for the whole prompt's length, as transformers' one-forward prefill does)."""
    ref, ours = pair
    prompt = tokens(prompt_len, 3)
    engine = Engine(ours, None, EngineConfig(max_batch=1, prefill_chunk=5), runner=runner_of(ours, kind))
    assert engine.context == 2 * TRAINED
    got = engine.stream(prompt, GenerationSpec(max_new_tokens=new, eos_token_ids=()))
    generated = [t for e in got for t in e.token_ids]
    assert generated == reference_generate(ref, prompt, new)


@pytest.mark.parametrize("kind", ["native", "torch"])
def test_each_sequence_of_a_batch_keeps_its_own_frequencies(pair, kind):
    """Three sequences of different lengths decoded together past the limit: each gets the tokens and logits
    it gets alone, which are transformers' (which itself scales a padded batch by its longest row)."""
    ref, ours = pair
    runner = runner_of(ours, kind)
    spec = GenerationSpec(max_new_tokens=12, eos_token_ids=())
    prompts = [tokens(n, 10 + n) for n in (5, 19, 12)]
    engine = Engine(ours, None, EngineConfig(max_batch=3, prefill_chunk=7, keep_logits=True), runner=runner)
    reqs = [engine.add(p, spec) for p in prompts]
    while not all(r.finished for r in reqs):
        engine.step()
    for p, r in zip(prompts, reqs):
        alone = Engine(ours, None, EngineConfig(max_batch=1, keep_logits=True), runner=runner)
        solo = alone.add(p, spec)
        while not solo.finished:
            alone.step()
        assert r.generated == solo.generated == reference_generate(ref, p, 12)
        # The native step is bitwise batch-invariant; the PyTorch layers batch decode rows into one matmul.
        tol = 0.0 if kind == "native" else 1e-4
        assert all((a - b).abs().max().item() <= tol for a, b in zip(r.logits, solo.logits))


def test_prefix_reuse_only_where_keys_were_rotated_alike(pair):
    """Reused keys must carry the rotation the new prompt needs: a prompt past the limit is rotated for its own
    length, so its keys serve a prompt of that length only."""
    ref, ours = pair
    spec = GenerationSpec(max_new_tokens=6, eos_token_ids=())
    engine = Engine(ours, None, EngineConfig(max_batch=1))
    base = tokens(20, 4)
    cases = [
        (base[:10], 0),  # fresh
        (base[:13], 10),  # both within 16 positions: the unscaled keys are reused
        (base, 0),  # 20 > 16: needs keys rotated for 20, the slot's were unscaled
        (base[:18] + [7, 9, 11], 0),  # 21 tokens: the slot's keys were rotated for 20
        (base[:18] + [7, 9, 11], 20),  # the same 21-token prompt again: its own prompt keys (the last runs again)
    ]
    for prompt, cached in cases:
        req = engine.add(prompt, spec)
        while not req.finished:
            engine.step()
        assert req.timings.cached_tokens == cached, prompt
        assert req.generated == reference_generate(ref, prompt, 6)


@pytest.mark.parametrize("prompt", [3, 20])
def test_native_step_equals_the_layers_past_the_limit(pair, prompt):
    """Logits and cache after a prompt (rotated for its length) and decode steps to position 30, as in
    tests/test_native_step.py: the native step rotates with the PyTorch path's own cos/sin tables."""
    _, ours = pair
    native = runner_of(ours, "native")
    ids = tokens(31, 6)
    results = []
    for runner in (native, TorchRunner(ours, "reference")):
        cache = runner.new_cache(1, 32)
        with torch.inference_mode():
            out = [runner.forward(cache, [Segment(0, ids[:prompt], rope_len=prompt)])[0]]
            out += [runner.forward(cache, [Segment(0, [t])])[0] for t in ids[prompt:]]
        results.append((torch.stack(out), cache))
    (fast, fast_cache), (slow, slow_cache) = results
    # test_native_step.py's tolerance: its matmuls sum in another order than torch's
    assert (fast - slow).abs().max().item() <= 1e-5 * max(1.0, slow.abs().max().item())
    for a, b in zip(fast_cache.keys + fast_cache.values, slow_cache.keys + slow_cache.values):
        assert (a[:, :, :31] - b[:, :, :31]).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    # Not vacuous: keys past the limit rotated without dynamic NTK would differ far more.
    cache = native.new_cache(1, 32)
    with torch.inference_mode():
        native.forward(cache, [Segment(0, ids[:prompt], rope_len=TRAINED)])
    assert (cache.keys[0][:, :, :prompt] - slow_cache.keys[0][:, :, :prompt]).abs().max().item() > 1e-3 or prompt <= TRAINED


# ---- how long a context each rope setup supports --------------------------------------------------------


@pytest.mark.parametrize("scaling,expected", [
    (None, 128),
    ({"type": "linear", "factor": 2.0}, 256),
    ({"rope_type": "dynamic", "factor": 4.0}, 512),
    ({"rope_type": "dynamic", "factor": 1.0}, 128),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, 128),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128),
    ({"rope_type": "yarn", "factor": 4.0}, 512),  # Qwen2.5's style: original defaults to max_position_embeddings
])
def test_supported_context_per_rope_type(scaling, expected):
    config = ModelConfig.from_dict(config_dict(LLAMA_BASE, {"rope_scaling": scaling} if scaling else {}))
    assert supported_context(config) == expected
    assert resolve_context(config, None) == expected and resolve_context(config, expected) == expected
    with pytest.raises(InputError, match=f"a context of {expected + 1} tokens is longer than the model supports "
                                         f"\\({expected}") as e:
        resolve_context(config, expected + 1)
    assert e.value.hint.startswith(f"use --context {expected} or less")
    if scaling is None:
        assert '"rope_type": "dynamic", "factor": 2.0' in e.value.hint


def test_engine_refuses_a_context_the_model_does_not_support(pair):
    _, ours = pair
    assert Engine(ours, None, EngineConfig(max_context=20)).context == 20
    assert Engine(ours, None, EngineConfig()).context == 32  # None: the model's (rope-scaled) context
    with pytest.raises(InputError, match=r"context of 33 tokens is longer than the model supports \(32: "
                                         r"rope_scaling dynamic with factor 2\.0\)"):
        Engine(ours, None, EngineConfig(max_context=33))


def test_fit_checks_and_perplexity_use_the_same_rule(pair, monkeypatch):
    from llm_torch.core.placement import memory
    from llm_torch.core.tasks import perplexity
    from llm_torch.core.placement.device_map import DeviceBudget, plan

    _, ours = pair
    config = ours.config
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**40)
    memory.check_fits(config, torch.float32, cpu, context=32)
    with pytest.raises(InputError, match="context of 33 tokens"):
        memory.check_fits(config, torch.float32, cpu, context=33)
    assert plan(config, torch.float32, [DeviceBudget("cpu", 2**40)]).context == 32
    with pytest.raises(InputError, match="context of 40 tokens"):
        plan(config, torch.float32, [DeviceBudget("cpu", 2**40)], context=40)
    with pytest.raises(InputError, match="the window of 33 tokens is longer than the model supports"):
        next(perplexity.score(ours, None, [], context=33))


@torch.no_grad()
def test_perplexity_window_past_max_position_embeddings_is_the_references(pair):
    ref, ours = pair
    ids = tokens(30, 8)
    nll, scored = perplexity_window(ours, ids)
    expected = ref(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() * 29
    assert scored == 29 and abs(nll - expected) < 1e-4 * expected


def test_perplexity_window_in_chunks_is_the_references(pair, monkeypatch):
    """A window run in chunks through the KV cache: every chunk rotated for the whole window's length."""
    from llm_torch.core.tasks import perplexity

    monkeypatch.setattr(perplexity, "CHUNK", 8)
    test_perplexity_window_past_max_position_embeddings_is_the_references(pair)


def perplexity_window(model, ids):
    from llm_torch.core.tasks.perplexity import window_nll

    return window_nll(model, ids, 30, 30)


# ---- Gemma 2's sliding layers at 8k --------------------------------------------------------------------


def test_gemma2_sliding_layers_hold_window_sized_rings_at_8k():
    """gemma-2-2b's shapes (transformers' Gemma2Config defaults): 26 layers alternating sliding (window 4096)
    and full, 4 KV heads of 256. At an 8192-token context the 13 sliding layers keep rings of window + the
    engine's prefill chunk (256) positions; the total follows kv_cache.py's formula. Built on the meta
    device: the shapes, no memory."""
    from transformers import Gemma2Config

    config = ModelConfig.from_dict(Gemma2Config().to_dict())
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim, config.sliding_window) == (26, 4, 256, 4096)
    context, margin = 8192, EngineConfig().prefill_chunk
    cache = KVCache(config, 1, context, ring_margin=margin, device="meta")
    caps = [k.shape[2] for k in cache.keys]
    sliding = [i for i, t in enumerate(config.layer_types) if t == "sliding_attention"]
    assert len(sliding) == 13
    assert all(caps[i] == (4096 + margin if i in sliding else context) for i in range(26))
    per_position = 2 * 1 * 4 * 256 * 4  # K and V, 1 slot, H_kv, D, fp32 bytes
    assert cache.nbytes == per_position * (13 * context + 13 * (4096 + margin)) == KVCache.bytes_for(config, 1, context, margin)
    full = KVCache.bytes_for(config, 1, context, None)  # every layer keeping all 8192 positions
    assert full == per_position * 26 * context
    assert cache.nbytes / 2**20 == 1274.0 and full / 2**20 == 1664.0  # MiB, fp32 (half in bf16 on a GPU)
