"""The native step (core/engine/native_step.py + kernels/step.c + gemm.c) against the PyTorch layers it stands in
for: same logits step after step and same cache contents for every family variant and weight layout;
each row's logits bitwise the same alone, batched with others, or with its prompt cut into other chunks;
and every model it does not cover runs the layers and says why."""

from __future__ import annotations

import threading

import pytest
import torch

from llm_torch.core import kernels
from llm_torch.core.placement.loading import ResolvedModel, load_resolved
from llm_torch.core.engine.runner import NATIVE, NativeRunner, Segment, TorchRunner, describe, make_runner
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


def load(folder, dtype="float32"):
    return load_resolved(ResolvedModel("tiny", "folder", folder), dtype=dtype, with_tokenizer=False).model


def ids_for(model, n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()


@torch.inference_mode()
def decode(runner, steps: int = 14, prompt: int = 3, seed: int = 5, slots: int = 1, slot: int = 0):
    """Prefill `prompt` tokens in one segment, then `steps` single tokens (fixed ids): logits [steps + 1, V]
    and the cache."""
    ids = ids_for(runner.model, prompt + steps, seed)
    cache = runner.new_cache(slots, prompt + steps + 4)
    out = [runner.forward(cache, [Segment(slot, ids[:prompt])])[0]]
    out += [runner.forward(cache, [Segment(slot, [t])])[0] for t in ids[prompt:]]
    return torch.stack(out), cache


# How far apart two caches' keys may be, relative to their largest, beyond the logits' tolerance: an ulp of
# difference in a key before rounding can round it one step of the format apart (f16 2^-11, bf16 2^-8; int8
# one code of 1/127 of its block's largest).
KV_STEP = {"f32": 0.0, "f16": 2.0**-10, "bf16": 2.0**-7, "int8": 1.01 / 127}


def assert_same_decode(model, tol=1e-5, **kw):
    fast_runner = make_runner(model)
    assert isinstance(fast_runner, NativeRunner) and fast_runner.description == NATIVE
    fast, fast_cache = decode(fast_runner, **kw)
    slow, slow_cache = decode(TorchRunner(model, "reference"), **kw)
    scale = slow.abs().max().item()
    assert scale > 0.05
    assert (fast - slow).abs().max().item() <= tol * max(1.0, scale)
    assert fast_cache.lengths == slow_cache.lengths
    assert fast_cache.kv_format == slow_cache.kv_format == model.kv_format()
    n, step = fast_cache.lengths[0], KV_STEP[fast_cache.kv_format]
    for layer in range(model.config.num_hidden_layers):  # as stored, widened (int8: codes times scales)
        for a, b in zip(fast_cache.read(layer, [0], [n]), slow_cache.read(layer, [0], [n])):
            assert (a - b).abs().max().item() <= (tol + step) * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_native_step_equals_layers(folders, name):
    """14 decode steps past a 3-token prefill: crosses Gemma 2's 6-token window and the dynamic-rope context."""
    assert_same_decode(load(folders[name]))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("base,variant", [(LLAMA_BASE, dict(num_key_value_heads=2)),
                                          (GEMMA2_BASE, dict(sliding_window=150))])
def test_long_context_splits_the_keys(tmp_path, base, variant, threads):
    """Past 128 keys a row's attention is split into chunks whose partial softmaxes are merged (spread over
    1-3 threads); Gemma 2's sliding layers cross their 150-token window meanwhile."""
    folder = tmp_path / "long"
    hf_model(config_dict(base, dict(variant, max_position_embeddings=512))).save_pretrained(folder)
    model = load(folder)
    torch.set_num_threads(threads)
    try:
        assert_same_decode(model, prompt=200, steps=6)
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("isa", kernels.runnable_isas() or ["auto"])
def test_every_isa_the_cpu_runs(folders, isa, monkeypatch):
    """The whole step on each instruction set this CPU runs (LLM_ISA): an AVX-512 machine tests its AVX2 build."""
    monkeypatch.setenv("LLM_ISA", isa)
    monkeypatch.setattr(kernels, "_STATE", None)  # loaded again for this ISA; the loaded one comes back after
    if kernels.matvec() is None:
        pytest.skip(kernels.status().detail)
    assert kernels.status().detail == f"native {kernels.ISAS[isa][2]} kernels" or isa == "auto"
    assert_same_decode(load(folders["llama-gqa"]))
    assert_same_decode(load(folders["llama-gqa"], "float16"), tol=1e-4)  # f16 tiles and the f16 KV cache


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_weights(folders, dtype):
    # 16-bit weights get an f16 KV cache: a key one fp32 ulp apart before rounding (the native tiles' and torch's
    # sums differ in order) can store one f16 step (2^-11) apart, ~1e-5 of the logits' scale, 2e-5 seen.
    assert_same_decode(load(folders["llama-gqa"], dtype), tol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int8-dynamic"])
def test_quantized_layers(folders, scheme):
    from llm_torch.quant.api import quantize_loaded
    from llm_torch.quant.spec import make_spec

    loaded = load_resolved(ResolvedModel("tiny", "folder", folders["llama-gqa"]), dtype="float32", with_tokenizer=False)
    quantize_loaded(loaded, make_spec(scheme, group_size=32))
    # The layers' math alone: an fp32 cache (the KV formats have their own tests below). Under the f16 cache a
    # quantized model gets, a key one f16 step apart can flip an activation's Q8 code a layer later (~4e-3).
    loaded.model.kv_cache = "f32"
    # int4 and int8-dynamic round activations to int8 blocks: an ulp of difference in the residual stream
    # (a different but equally exact sum order) can move a code by one step, ~1e-3 of the logits.
    assert_same_decode(loaded.model, tol=1e-5 if scheme == "int8" else 2e-3)


# ---- KV cache formats (--kv-cache): step.c rounds keys and values as kv_cache.py does -------------------

KV_CASES = {"llama": config_dict(LLAMA_BASE, dict(num_key_value_heads=2, head_dim=32)),
            "gemma2": config_dict(GEMMA2_BASE, dict(head_dim=32))}  # int8 scales blocks of 32 along head_dim


@pytest.fixture(scope="module")
def kv_folders(tmp_path_factory):
    out = {}
    for name, cfg in KV_CASES.items():
        out[name] = tmp_path_factory.mktemp("kv-" + name)
        hf_model(cfg).save_pretrained(out[name])
    return out


@pytest.mark.parametrize("kv", ["f16", "bf16", "int8"])
@pytest.mark.parametrize("name", list(KV_CASES))
def test_kv_formats_native_equals_layers(kv_folders, name, kv):
    """Keys and values stored narrow: both paths round them alike and attend over the widened values. A key
    a rounding step apart (an ulp before rounding) moves the logits by ~1e-4 of their scale; an int8 code one
    step apart (1/127 of its block's largest) by up to ~2e-3 (1.6e-3 seen with AVX-512's sum order)."""
    model = load(kv_folders[name])
    model.kv_cache = kv
    assert_same_decode(model, tol={"bf16": 1e-3, "int8": 3e-3}.get(kv, 5e-4))


@pytest.mark.parametrize("kv", ["f16", "int8"])
def test_kv_formats_past_one_key_chunk(kv_folders, kv):
    model = load(kv_folders["gemma2"])
    model.kv_cache = kv
    assert_same_decode(model, tol=5e-4, prompt=140, steps=4)


@pytest.mark.parametrize("kv", ["f16", "int8"])
def test_kv_format_rounding_matches_bitwise(kv_folders, kv):
    """What step.c stores is what KVCache.write stores for those values: the native path's cache, read back and
    written through the PyTorch side, gives the same bits (a different scale rule, block layout or rounding
    would not)."""
    from llm_torch.core.model.kv_cache import KVCache

    model = load(kv_folders["llama"])
    model.kv_cache = kv
    _, cache = decode(make_runner(model), steps=4)
    n = cache.lengths[0]
    again = KVCache(model.config, 1, cache.capacity, kv_format=kv)
    for layer in range(model.config.num_hidden_layers):
        k, v = cache.read(layer, [0], [n])
        again.write(layer, [0], [0], k, v)
        for mine, theirs in zip(again.stores(), cache.stores()):
            assert torch.equal(mine[layer][:, :, :n], theirs[layer][:, :, :n])


# Prefill + decode through a narrow cache against one forward over the whole sequence (no cache, fp32 keys),
# relative to the logits' scale: what rounding the keys and values costs on a tiny random model.
FULL_FORWARD_TOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2, "int8": 6e-2}  # int8 measured 3.8e-2


@pytest.mark.parametrize("kv", list(FULL_FORWARD_TOL))
def test_prefill_and_decode_equal_the_full_forward(kv_folders, kv):
    model = load(kv_folders["llama"])
    model.kv_cache = kv
    steps, prompt = 10, 5
    got, _ = decode(make_runner(model), steps=steps, prompt=prompt)
    ids = ids_for(model, prompt + steps)
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0, prompt - 1 :].float()
    err = (got - full).abs().max().item() / full.abs().max().item()
    assert err <= FULL_FORWARD_TOL[kv]
    if kv != "f32":
        assert err > 1e-7  # the keys were rounded: the test sees the format


def test_kv_format_auto_follows_the_weights(kv_folders):
    """auto on a CPU: fp32 models keep f32 keys (their parity tolerances hold), 16-bit and quantized ones f16."""
    from llm_torch.quant.api import quantize_loaded
    from llm_torch.quant.spec import make_spec

    assert load(kv_folders["llama"]).kv_format() == "f32"
    assert load(kv_folders["llama"], "bfloat16").kv_format() == "f16"
    assert load(kv_folders["llama"], "float16").kv_format() == "f16"
    loaded = load_resolved(ResolvedModel("tiny", "folder", kv_folders["llama"]), dtype="float32", with_tokenizer=False,
                           kv_cache="auto")
    quantize_loaded(loaded, make_spec("int8"))
    assert loaded.model.kv_format() == "f16"
    assert make_runner(loaded.model).new_cache(1, 8).keys[0].dtype == torch.float16
    chosen = load_resolved(ResolvedModel("tiny", "folder", kv_folders["llama"]), dtype="bfloat16",
                           with_tokenizer=False, kv_cache="f32").model
    assert chosen.kv_format() == "f32"


# ---- batch invariance: what lets a seeded request trust the batched path -----------------------------


@pytest.mark.parametrize("name,dtype,kv", [("llama-gqa", "float32", "auto"), ("gemma2-default_layers", "float32", "auto"),
                                           ("llama-gqa", "float16", "auto"), ("kv-llama", "float32", "int8"),
                                           ("kv-gemma2", "bfloat16", "bf16")])
def test_rows_are_bitwise_the_same_alone_batched_and_chunked(folders, kv_folders, name, dtype, kv):
    """Three sequences decoded in one call give bitwise the logits each gets alone; a prompt fed in uneven
    chunks (next to other rows) gives bitwise those of one token at a time. In every KV format (float16
    weights: f16 keys)."""
    model = load(kv_folders[name[3:]] if name.startswith("kv-") else folders[name], dtype)
    model.kv_cache = kv
    runner = make_runner(model)
    lengths, steps = (3, 11, 7), 6
    seqs = [ids_for(runner.model, n + steps, seed=n) for n in lengths]
    alone = []
    for slot, (n, ids) in enumerate(zip(lengths, seqs)):
        cache = runner.new_cache(3, 32)
        with torch.inference_mode():
            rows = [runner.forward(cache, [Segment(slot, [t])])[0] for t in ids[:n]]
            rows += [runner.forward(cache, [Segment(slot, [t])])[0] for t in ids[n:]]
        alone.append(torch.stack(rows[n - 1 :]))
    cache = runner.new_cache(3, 32)
    got = [[] for _ in seqs]
    with torch.inference_mode():
        # Prompts in chunks of 2 (the 11-token one also as a 5 + 6 split), all in the same calls.
        fed = [0, 0, 0]
        while any(f < n for f, n in zip(fed, lengths)):
            segs, owners = [], []
            for s, (n, ids) in enumerate(zip(lengths, seqs)):
                if fed[s] < n:
                    size = 5 if s == 1 and fed[s] == 0 else 2 if s != 1 else 6
                    chunk = ids[fed[s] : min(n, fed[s] + size)]
                    segs.append(Segment(s, chunk, logits=fed[s] + len(chunk) == n))
                    owners.append(s)
                    fed[s] += len(chunk)
            out = runner.forward(cache, segs)
            for row, s in zip(out, [o for o, seg in zip(owners, segs) if seg.logits]):
                got[s].append(row)
        for t in range(steps):
            out = runner.forward(cache, [Segment(s, [seqs[s][lengths[s] + t]]) for s in range(3)])
            for s in range(3):
                got[s].append(out[s])
    for s in range(3):
        assert torch.equal(torch.stack(got[s]), alone[s]), f"sequence {s}"


def test_two_threads_decoding_through_one_runner(folders):
    """Each Python thread with its own cache gets the logits it gets alone (the step's buffers are shared)."""
    runner = make_runner(load(folders["llama-gqa"]))
    alone, _ = decode(runner, steps=30)
    got, errors = [None, None], []

    def worker(i):
        try:
            got[i] = decode(runner, steps=30)[0]
        except Exception as e:  # surfaced below: a failure in a thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(g, alone) for g in got)


# ---- where it does not run, it says why ----------------------------------------------------------------


def test_unsupported_layer_says_why(folders):
    class Wrapped(torch.nn.Module):  # e.g. a layer kind step.c has no kernel for (bitsandbytes' 4-bit)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = load(folders["llama-gqa"])
    mlp = model.model.layers[1].mlp
    mlp.down_proj = Wrapped(mlp.down_proj)
    runner = make_runner(model)
    assert isinstance(runner, TorchRunner)
    assert runner.description == "PyTorch layers: not for Wrapped projections"
    assert decode(runner, steps=2)[0].shape[0] == 3  # the layers run it


def test_switched_off_by_environment(folders, monkeypatch):
    monkeypatch.setattr(kernels, "_STATE", None)
    monkeypatch.setenv("LLM_KERNELS", "matvec")
    try:
        model = load(folders["llama-gqa"])
        assert kernels.status().detail.endswith(" matvec kernels (LLM_KERNELS=matvec)")
        assert describe(model) == "PyTorch layers: the native step is off (LLM_KERNELS=matvec)"
    finally:
        kernels._STATE = None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import of torch.jit
def test_compile_says_it_runs_the_layers(folders):
    from llm_torch.core.engine.speed import compile_model

    model = load(folders["llama-gqa"])
    compile_model(model)  # lazy: nothing is compiled until the first one-token call
    assert describe(model) == "PyTorch layers: torch.compile (--compile)"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compile_is_the_runners_not_the_models(folders):
    """--compile installs a runner whose decode is compiled; the model's own forward stays the eager reference."""
    from llm_torch.core.engine.speed import compile_model

    model = load(folders["llama-gqa"])
    compile_model(model)
    assert "forward" not in vars(model)  # not replaced on the instance: other callers get the eager layers
    first, second = make_runner(model), make_runner(model)
    assert isinstance(first, TorchRunner) and first.decode is not model
    assert second.decode is first.decode  # one compiled function (one compile cache) for every engine


def test_other_heads_do_not_generate(folders):
    model = load(folders["llama-gqa"])
    assert describe(model.model) == "no generation head"  # the decoder alone, as a bare LlamaModel loads
    with pytest.raises(TypeError, match="causal LM head"):
        make_runner(model.model)
