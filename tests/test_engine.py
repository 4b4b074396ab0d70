"""The engine's scheduler (core/engine/engine.py): every sequence of a batch gets what it gets alone, whoever joins,
leaves or is cancelled around it; prompts prefilled in chunks between others' decode steps; prefix reuse;
bad rows fail alone. Run on the native step and on the PyTorch layers (the reference runner)."""

from __future__ import annotations

import pytest
import torch

from llm_torch.core.engine.engine import Engine, EngineConfig
from llm_torch.core.errors import InputError
from llm_torch.core.engine.spec import GenerationSpec
from llm_torch.core.model.kv_cache import KVCache
from llm_torch.core.placement.loading import ResolvedModel, load_resolved
from llm_torch.core.engine.runner import NativeRunner, TorchRunner, make_runner
from llm_torch.core.engine.sampling import SamplingSpec
from tests.tiny import GEMMA2_BASE, LLAMA_BASE, config_dict, hf_model

FAMILIES = {
    "llama": config_dict(LLAMA_BASE, {}),
    "llama-gqa": config_dict(LLAMA_BASE, dict(num_key_value_heads=2)),
    "gemma2": config_dict(GEMMA2_BASE, {}),  # sliding window 6: shorter than most prompts here
}
GREEDY = GenerationSpec(max_new_tokens=12, eos_token_ids=())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, cfg in FAMILIES.items():
        folder = tmp_path_factory.mktemp(name)
        hf_model(cfg).save_pretrained(folder)
        out[name] = load_resolved(ResolvedModel(name, "folder", folder), dtype="float32", with_tokenizer=False).model
    return out


def runner_of(model, kind):
    if kind == "torch":
        return TorchRunner(model, "reference")
    runner = make_runner(model)
    if not isinstance(runner, NativeRunner):
        pytest.skip(f"native step unavailable: {runner.description}")
    return runner


def prompts(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def alone(model, runner, prompt, spec=GREEDY, **cfg):
    engine = Engine(model, None, EngineConfig(max_batch=1, keep_logits=True, **cfg), runner=runner)
    req = engine.add(prompt, spec)
    while not req.finished:
        engine.step()
    return req


def run_all(engine, reqs):
    while not all(r.finished for r in reqs):
        engine.step()


def assert_same(got, ref, tol=1e-4):
    assert got.generated == ref.generated and got.finish_reason == ref.finish_reason
    assert len(got.logits) == len(ref.logits)
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("kind", ["native", "torch"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_batch_of_different_lengths_equals_alone(models, family, kind):
    model = models[family]
    runner = runner_of(model, kind)
    ps = prompts(model, (3, 17, 9, 1))
    engine = Engine(model, None, EngineConfig(max_batch=4, keep_logits=True, prefill_chunk=8), runner=runner)
    reqs = [engine.add(p, GREEDY) for p in ps]
    run_all(engine, reqs)
    for p, r in zip(ps, reqs):
        ref = alone(model, runner, p)
        assert_same(r, ref)
        if kind == "native":  # batch invariance: bitwise, not just close
            assert all(torch.equal(a, b) for a, b in zip(r.logits, ref.logits))


@pytest.mark.parametrize("kind", ["native", "torch"])
@pytest.mark.parametrize("family", ["llama-gqa", "gemma2"])
def test_joining_after_five_steps_equals_alone(models, family, kind):
    model = models[family]
    runner = runner_of(model, kind)
    first, late = prompts(model, (5, 14), seed=1)
    engine = Engine(model, None, EngineConfig(max_batch=2, keep_logits=True), runner=runner)
    a = engine.add(first, GREEDY)
    while len(a.generated) < 5:
        engine.step()
    b = engine.add(late, GREEDY)
    run_all(engine, [a, b])
    assert_same(a, alone(model, runner, first))
    assert_same(b, alone(model, runner, late))


def test_seeded_sampling_is_the_same_whatever_the_batch(models):
    model = models["llama-gqa"]
    runner = runner_of(model, "native")
    spec = GenerationSpec(max_new_tokens=16, eos_token_ids=(),
                          sampling=SamplingSpec(temperature=1.3, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=7))
    p, *others = prompts(model, (6, 3, 12), seed=2)
    ref = alone(model, runner, p, spec)
    engine = Engine(model, None, EngineConfig(max_batch=3), runner=runner)
    other_specs = [GenerationSpec(max_new_tokens=9, sampling=SamplingSpec(temperature=0.7, seed=s), eos_token_ids=())
                   for s in (1, 2)]
    reqs = [engine.add(others[0], other_specs[0]), engine.add(p, spec), engine.add(others[1], other_specs[1])]
    run_all(engine, reqs)
    assert reqs[1].generated == ref.generated
    assert len(set(map(tuple, [ref.generated] + [r.generated for r in reqs]))) == 3  # sampling did sample


def test_cancelling_one_leaves_the_others_unchanged(models):
    model = models["gemma2"]
    runner = runner_of(model, "native")
    ps = prompts(model, (4, 10, 7), seed=3)
    engine = Engine(model, None, EngineConfig(max_batch=3, keep_logits=True), runner=runner)
    reqs = [engine.add(p, GREEDY) for p in ps]
    for _ in range(4):
        engine.step()
    engine.cancel(reqs[1])
    assert reqs[1].finished and reqs[1].finish_reason == "cancelled" and reqs[1].slot not in [r.slot for r in engine.running]
    assert engine.slots.count(None) == 1  # its slot is free at once
    late = engine.add(prompts(model, (8,), seed=9)[0], GREEDY)  # takes the freed slot mid-flight
    run_all(engine, [reqs[0], reqs[2], late])
    for i in (0, 2):
        assert_same(reqs[i], alone(model, runner, ps[i]))
    events = reqs[1].drain()
    assert events[-1].finish_reason == "cancelled" and sum(len(e.token_ids) for e in events) == len(reqs[1].generated)


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(models):
    model = models["llama-gqa"]
    runner = runner_of(model, "native")
    short, long = prompts(model, (3, 100), seed=4)
    engine = Engine(model, None, EngineConfig(max_batch=2, prefill_chunk=16, keep_logits=True), runner=runner)
    a = engine.add(short, GenerationSpec(max_new_tokens=30, eos_token_ids=()))
    engine.step()  # a's prompt; a now decodes
    b = engine.add(long, GREEDY)
    steps_until_b = 0
    while not b.generated:
        before = len(a.generated)
        engine.step()
        steps_until_b += 1
        assert len(a.generated) == before + 1  # a decodes on every step of b's prefill
    # 100 prompt tokens minus a's decode token per step: the budget is the prompt chunk, decode rides along
    assert steps_until_b == 7
    run_all(engine, [a, b])
    assert_same(a, alone(model, runner, short, GenerationSpec(max_new_tokens=30, eos_token_ids=())))
    assert_same(b, alone(model, runner, long))


@pytest.mark.parametrize("family", ["llama-gqa", "gemma2"])
def test_prefix_reuse_skips_the_cached_prompt_and_changes_nothing(models, family, monkeypatch):
    model = models[family]
    runner = runner_of(model, "native")
    (system,) = prompts(model, (20,), seed=5)
    turn1 = system + prompts(model, (5,), seed=6)[0]
    engine = Engine(model, None, EngineConfig(max_batch=2, keep_logits=True), runner=runner)
    fed = []
    forward = runner.forward
    monkeypatch.setattr(runner, "forward", lambda cache, segs: fed.append(sum(len(s.tokens) for s in segs)) or forward(cache, segs))
    first = engine.add(turn1, GREEDY)
    run_all(engine, [first])
    # The next turn: the whole history re-sent plus a new message, as chat clients do.
    turn2 = turn1 + first.generated + prompts(model, (6,), seed=7)[0]
    fed.clear()
    second = engine.add(turn2, GREEDY)
    run_all(engine, [second])
    cached = len(turn1) + len(first.generated) - 1  # the last answer token was sampled, never fed
    assert second.timings.cached_tokens == cached
    assert sum(fed) == len(turn2) - cached + len(second.generated) - 1
    assert_same(second, alone(model, runner, turn2))
    # A third request sharing only the system prompt with a slot that is busy: copied from it.
    busy = engine.add(turn2, GREEDY)
    engine.step()
    other = engine.add(system + prompts(model, (4,), seed=8)[0], GREEDY)
    engine.step()
    assert other.slot != busy.slot and other.timings.cached_tokens == len(system)
    run_all(engine, [busy, other])
    assert_same(other, alone(model, runner, other.prompt))


def test_sliding_window_ring_keeps_only_the_window(models):
    """Gemma 2's sliding layers hold window + chunk positions per slot, whatever the context."""
    model = models["gemma2"]
    runner = runner_of(model, "native")
    engine = Engine(model, None, EngineConfig(max_batch=2, prefill_chunk=4, keep_logits=True), runner=runner)
    (p,) = prompts(model, (40,), seed=10)
    spec = GenerationSpec(max_new_tokens=30, eos_token_ids=())
    req = engine.add(p, spec)
    run_all(engine, [req])
    caps = [t.shape[2] for t in engine.cache.keys]
    kinds = model.config.layer_types
    assert all(c == 6 + 4 for c, k in zip(caps, kinds) if k == "sliding_attention")
    assert all(c >= 70 for c, k in zip(caps, kinds) if k == "full_attention")
    assert_same(req, alone(model, TorchRunner(model, "reference"), p, spec, prefill_chunk=64))
    # Reusing the ring needs the window before the common prefix still there: here it is not.
    again = engine.add(p + [5, 6], spec)
    engine.step()
    assert again.timings.cached_tokens == 0
    bound = KVCache.bytes_for(model.config, 2, engine.context, 4)
    assert engine.kv_bytes_limit == bound and engine.cache.nbytes <= bound


def test_bad_requests_fail_alone(models):
    model = models["llama"]
    runner = runner_of(model, "native")
    engine = Engine(model, None, EngineConfig(max_batch=2), runner=runner)
    with pytest.raises(InputError, match="empty"):
        engine.add([], GREEDY)
    with pytest.raises(InputError, match=r"prompt is 200 tokens but the context holds 128"):
        engine.add([5] * 200, GREEDY)
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.add([5, 999], GREEDY)
    zero = engine.add([5, 6], GenerationSpec(max_new_tokens=0))
    assert zero.finished and zero.finish_reason == "length" and zero.generated == []
    assert engine.add([5] * 200, GenerationSpec(max_new_tokens=4, truncate=True, eos_token_ids=())).timings.truncated_tokens == 73
    good = prompts(model, (4, 6), seed=11)
    batch = [(good[0], GREEDY), ([], GREEDY), ([5] * 500, GREEDY), (good[1], GREEDY)]
    results = list(Engine(model, None, EngineConfig(max_batch=2), runner=runner).run(batch))
    assert [r.finish_reason for r in results] == ["length", "error", "error", "length"]
    assert "empty" in results[1].error and "context" in results[2].error
    assert results[0].token_ids == alone(model, runner, good[0]).generated
    assert results[3].token_ids == alone(model, runner, good[1]).generated


def test_queue_limit_and_context_budget(models):
    from llm_torch.core.engine.engine import QueueFullError

    model = models["llama"]
    runner = runner_of(model, "native")
    engine = Engine(model, None, EngineConfig(max_batch=1, max_queue=1, max_context=32), runner=runner)
    engine.add([5, 6], GREEDY)
    engine.add([5, 6], GREEDY)  # waits
    with pytest.raises(QueueFullError, match="1 requests already wait"):
        engine.add([5, 6], GREEDY)
    with pytest.raises(InputError, match="context holds 32"):
        engine.add([5] * 40, GREEDY)
    long = Engine(model, None, EngineConfig(max_batch=1, max_context=32), runner=runner).add([5] * 25, GREEDY)
    assert long.budget == 7  # the answer is cut by the context: finish_reason 'length'


def test_a_request_the_memory_cannot_hold_fails_alone(models, monkeypatch):
    """Growing the KV cache for a long request runs out of memory: that request ends with 'error' and the
    message, the cache keeps its old size, and the running ones go on."""
    model = models["llama"]
    runner = runner_of(model, "native")
    engine = Engine(model, None, EngineConfig(max_batch=2), runner=runner)
    short = engine.add([5, 6, 7], GREEDY)
    engine.step()
    real = KVCache._new

    def tight(self, cap, layer):
        if cap > 64:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(self, cap, layer)

    monkeypatch.setattr(KVCache, "_new", tight)
    big = engine.add([5] * 100, GREEDY)
    touched = engine.step()
    assert big in touched and big.finish_reason == "error" and "out of memory growing the KV cache" in big.error
    assert engine.cache.capacity <= 64
    run_all(engine, [short])
    assert short.generated == alone(model, runner, [5, 6, 7]).generated


def test_an_answer_that_outgrows_the_memory_ends_alone(models, monkeypatch):
    """The cache grows as answers do (no reservation for the whole budget); when it cannot, the sequence that
    needs the room ends with 'error' and the one that fits finishes as it would alone."""
    model = models["llama"]
    runner = runner_of(model, "native")
    real = KVCache._new
    monkeypatch.setattr(KVCache, "_new", lambda self, cap, layer: real(self, cap, layer) if cap <= 64 else
                        (_ for _ in ()).throw(RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    engine = Engine(model, None, EngineConfig(max_batch=2), runner=runner)
    long = engine.add([5, 6, 7], GenerationSpec(max_new_tokens=100, eos_token_ids=()))
    short = engine.add([8, 9], GREEDY)
    run_all(engine, [long, short])
    assert long.finish_reason == "error" and "out of memory" in long.error and len(long.generated) == 62  # 64 positions held 3 + 61
    assert short.finish_reason == "length" and short.generated == alone(model, runner, [8, 9]).generated
