"""The native one-token decode step (core/decode_step.py + kernels/step.c) against the PyTorch layers it
replaces: same logits step after step, same cache contents, for every family variant and weight layout;
and every case it does not cover runs the layers and says why."""

from __future__ import annotations

import pytest
import torch

from llm_torch.core import decode_step, kernels
from llm_torch.core.loading import ResolvedModel, load_resolved
from tests.tiny import GEMMA2_BASE, GEMMA2_VARIANTS, LLAMA_BASE, LLAMA_VARIANTS, config_dict, hf_model

native = kernels.matvec()
pytestmark = pytest.mark.skipif(native is None, reason=f"native kernels unavailable here: {kernels.status().detail}")

CASES = [("llama-" + k, config_dict(LLAMA_BASE, v)) for k, v in LLAMA_VARIANTS.items()] + [
    ("gemma2-" + k, config_dict(GEMMA2_BASE, v)) for k, v in GEMMA2_VARIANTS.items()
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, cfg in CASES:
        folder = tmp_path_factory.mktemp(name)
        hf_model(cfg).save_pretrained(folder)
        out[name] = folder
    return out


def load(folder, dtype="float32", fuse=True):
    return load_resolved(ResolvedModel("tiny", "folder", folder), dtype=dtype, with_tokenizer=False, fuse=fuse).model


@torch.inference_mode()
def decode(model, native_step: bool, steps: int = 14, prompt: int = 3):
    """Prefill `prompt` tokens, then `steps` single tokens (fixed ids): logits [steps, V] and the cache."""
    model.model.native_step = native_step
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt + steps), generator=g)
    cache = model.new_cache(1, prompt + steps + 4)
    model(ids[:, :prompt], cache=cache, last_only=True)
    out = [model(ids[:, t : t + 1], cache=cache)[0, -1] for t in range(prompt, prompt + steps)]
    return torch.stack(out), cache


def assert_same_decode(model, tol=1e-5, **kw):
    assert model.model.decode_path() == decode_step.STEP
    fast, fast_cache = decode(model, True, **kw)
    slow, slow_cache = decode(model, False, **kw)
    scale = slow.abs().max().item()
    assert scale > 0.05
    assert (fast - slow).abs().max().item() <= tol * max(1.0, scale)
    n = fast_cache.length
    assert n == slow_cache.length
    for a, b in zip(fast_cache.keys + fast_cache.values, slow_cache.keys + slow_cache.values):
        assert (a[:, :, :n] - b[:, :, :n]).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_native_step_equals_layers(folders, name):
    """14 decode steps past a 3-token prefill: crosses Gemma 2's 6-token window and the dynamic-rope context."""
    assert_same_decode(load(folders[name]))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("base,variant", [(LLAMA_BASE, dict(num_key_value_heads=2)),
                                          (GEMMA2_BASE, dict(sliding_window=150))])
def test_long_context_splits_the_keys(tmp_path, base, variant, threads):
    """Past 64 keys per thread the step splits attention over the keys and merges the partial softmaxes
    (uneven shares with 3 threads); Gemma 2's sliding layers cross their 150-token window meanwhile."""
    folder = tmp_path / "long"
    hf_model(config_dict(base, dict(variant, max_position_embeddings=512))).save_pretrained(folder)
    model = load(folder)
    torch.set_num_threads(threads)
    try:
        assert_same_decode(model, prompt=200, steps=6)
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_weights(folders, dtype):
    assert_same_decode(load(folders["llama-gqa"], dtype))


def test_unfused_layout(folders):
    """Separate q/k/v and gate/up projections (fuse=False keeps transformers' module names)."""
    assert_same_decode(load(folders["llama-head_dim_bias"], fuse=False))
    assert_same_decode(load(folders["gemma2-default_layers"], fuse=False))


@pytest.mark.parametrize("scheme", ["int8", "int4", "int8-dynamic"])
def test_quantized_layers(folders, scheme):
    from llm_torch.quant.api import quantize_loaded
    from llm_torch.quant.spec import make_spec

    loaded = load_resolved(ResolvedModel("tiny", "folder", folders["llama-gqa"]), dtype="float32", with_tokenizer=False)
    decode(loaded.model, True)  # a step built over the float layers first: quantizing must drop it
    quantize_loaded(loaded, make_spec(scheme, group_size=32))
    # int4 and int8-dynamic round activations to int8 blocks: an ulp of difference in the residual stream
    # (a different but equally exact sum order) can move a code by one step, ~1e-3 of the logits.
    assert_same_decode(loaded.model, tol=1e-5 if scheme == "int8" else 2e-3)


def test_greedy_generation_unchanged(folders):
    """Through generate_tokens (the engine every command uses): the same tokens with and without the step."""
    from llm_torch.core.generate import GenerationSpec, generate_tokens
    from llm_torch.core.sampling import SamplingSpec

    model = load(folders["gemma2-layer_types"])
    spec = GenerationSpec(max_new_tokens=24, sampling=SamplingSpec(temperature=0.0))
    runs = []
    for flag in (True, False):
        model.model.native_step = flag
        runs.append(list(generate_tokens(model, [5, 9, 11], spec)))
    assert runs[0] == runs[1] and len(runs[0]) == 24


def test_what_it_does_not_cover_runs_the_layers(folders, monkeypatch):
    model = load(folders["llama-gqa"])
    with torch.inference_mode():
        assert model.model._decode_step() is not None
    # Autograd: the native step records no graph.
    assert model.model._decode_step() is None
    # A batch, a padding mask: the layers (checked by spying on the step).
    calls = []
    step = model.model.__dict__["_native_step"][1]
    monkeypatch.setattr(type(step), "__call__", lambda self, *a: calls.append(1) or pytest.fail("step used"))
    with torch.inference_mode():
        cache = model.new_cache(2, 8)
        model(torch.tensor([[4, 5], [6, 7]]), cache=cache)
        model(torch.tensor([[4], [6]]), cache=cache)
        cache = model.new_cache(1, 8)
        model(torch.tensor([[4, 5]]), cache=cache)
        model(torch.tensor([[4]]), cache=cache, attention_mask=torch.ones(1, 3))
    assert not calls


def test_unsupported_model_says_why(folders):
    class Wrapped(torch.nn.Module):  # e.g. a layer kind step.c has no kernel for (bitsandbytes' 4-bit)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = load(folders["llama-gqa"])
    mlp = model.model.layers[1].mlp
    mlp.down_proj = Wrapped(mlp.down_proj)
    model.model.reset_decode_step()
    assert model.model.decode_path() == "PyTorch layers: not for Wrapped projections"
    with torch.inference_mode():
        assert model.model._decode_step() is None
        model(torch.tensor([[4]]), cache=model.new_cache(1, 2))  # the layers run it


def test_switched_off_by_environment(folders, monkeypatch):
    monkeypatch.setattr(kernels, "_STATE", None)
    monkeypatch.setenv("LLM_KERNELS", "matvec")
    try:
        model = load(folders["llama-gqa"])
        assert kernels.status().detail == "native AVX2 matvec kernels (LLM_KERNELS=matvec)"
        assert model.model.decode_path() == "PyTorch layers: the native decode step is off"
    finally:
        kernels._STATE = None
        from llm_torch.core import layers

        layers.use_native_kernels()


def test_moving_the_model_rebuilds_it(folders):
    model = load(folders["llama-gqa"])
    with torch.inference_mode():
        first = model.model._decode_step()
        model.to(torch.float16)
        second = model.model._decode_step()
    assert first is not None and second is not None and second is not first


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import of torch.jit
def test_compile_says_it_runs_the_layers(folders):
    from llm_torch.core.model import decode_path
    from llm_torch.core.speed import compile_model

    model = load(folders["llama-gqa"])
    compile_model(model)  # lazy: nothing is compiled until the first one-token call
    assert decode_path(model) == "PyTorch layers: torch.compile (--compile)"


def test_a_cache_it_cannot_use_is_left_to_the_layers(folders):
    """A cache in another dtype (built by hand): the step does nothing and says so with None."""
    from llm_torch.core.model import KVCache

    model = load(folders["llama-gqa"])
    dec = model.model
    with torch.inference_mode():
        step = dec._decode_step()
        x = dec.embed_tokens(torch.tensor([[4]]))
        cos, sin = dec.rotary_emb(torch.tensor([[0]]), torch.float32)
        odd = KVCache(model.config, 1, 4, dtype=torch.float64)
        assert step(x, cos, sin, odd, 0) is None
        assert all(not t.any() for t in odd.keys + odd.values)  # nothing written
        assert step(x, cos, sin, model.new_cache(1, 4), 0) is not None


def test_two_threads_decoding_through_one_model(folders):
    """Each Python thread with its own cache gets the logits it gets alone (the step's buffers are shared)."""
    import threading

    model = load(folders["llama-gqa"])
    alone, _ = decode(model, True, steps=30)
    got, errors = [None, None], []

    def worker(i):
        try:
            got[i] = decode(model, True, steps=30)[0]
        except Exception as e:  # surfaced below: a failure in a thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(g, alone) for g in got)
