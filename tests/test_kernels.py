"""Native matrix kernels (core/kernels): equal to torch's products, each batched row bitwise what it is
alone, the C structs as Python mirrors them, and every reason they cannot run reported instead of hidden."""

from __future__ import annotations

import pytest
import torch

from llm_torch.core import kernels



needs_native = pytest.mark.skipif(kernels.matvec() is None, reason=f"native kernels unavailable here: {kernels.status().detail}")


@pytest.fixture(scope="module", params=kernels.runnable_isas() or ["auto"])
def native(request):
    """The kernels built for each ISA the CPU runs (LLM_ISA), loaded afresh and unloaded afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_ISA", request.param)
        mp.setattr(kernels, "_STATE", None)
        mv = kernels.matvec()
        if mv is None:
            pytest.skip(f"native kernels unavailable here: {kernels.status().detail}")
        yield mv


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A kernels module that loads again (own cache folder), restored afterwards."""
    monkeypatch.setattr(kernels, "_STATE", None)
    monkeypatch.setenv("LLM_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("LLM_ISA", raising=False)
    yield
    kernels._STATE = None


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("shape", [(1027, 579), (64, 64), (3, 8), (5, 7), (49152 // 16, 576)])
def test_matvec_equals_torch(dtype, tol, shape, native):
    """Odd shapes exercise the 32-, 8- and 1-wide tails; products match torch in fp32 (relative to |W||x|)."""
    g = torch.Generator().manual_seed(0)
    N, K = shape
    w = torch.randn(N, K, generator=g).to(dtype)
    x, bias = torch.randn(K, generator=g), torch.randn(N, generator=g)
    ref = torch.mv(w.double(), x.double())
    scale = (w.double().abs() @ x.double().abs()).max().item()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            got = native(w, x)
            with_bias = native(w, x, bias)
        finally:
            torch.set_num_threads(2)
        assert got.dtype == torch.float32 and got.shape == (N,)
        assert (got.double() - ref).abs().max().item() <= tol * scale
        assert torch.equal(with_bias, (got + bias)) or (with_bias - got - bias).abs().max().item() < 1e-6 * scale


@needs_native
def test_an_input_of_the_wrong_length_is_refused(native):
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="15 values"):
        native(w, torch.randn(15))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batched_rows_are_bitwise_each_row_alone(dtype, native):
    """B rows in one product (each weight read once for all): every row bitwise what it gets alone, for
    every tile shape (1-9 rows), past a block of rows (70), and with 1 or 2 threads, so a sequence's
    logits do not depend on what it is batched with."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(67, 101, generator=g).to(dtype)
    X, bias = torch.randn(70, 101, generator=g), torch.randn(67, generator=g)
    alone = torch.stack([native(w, x, bias) for x in X])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            for B in (*range(1, 10), 70):
                assert torch.equal(native(w, X[:B], bias), alone[:B])
        finally:
            torch.set_num_threads(2)
    ref = X.double() @ w.double().T + bias.double()
    assert (alone.double() - ref).abs().max().item() <= 1e-5 * (X.double().abs() @ w.double().abs().T).max().item()


@needs_native
@pytest.mark.parametrize("scheme", ["int8", "int8q8", "int4"])
def test_batched_quantized_rows_are_bitwise_each_row_alone(scheme, native):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(7, 256, generator=g)
    if scheme == "int4":
        _, packed, scale, zero, _, bias, _ = int4_case((37, 256), 64, seed=5)
        run = lambda x: native.int4(packed, scale, zero, 64, x, bias)  # noqa: E731
    else:
        q = torch.randint(-128, 128, (37, 256), generator=g, dtype=torch.int8)
        scale, bias = torch.rand(37, generator=g) / 100, torch.randn(37, generator=g)
        run = lambda x: native.int8(q, scale, x, bias, q8=scheme == "int8q8")  # noqa: E731
    alone = torch.stack([run(x) for x in X])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            for B in (2, 3, 5, 7):
                assert torch.equal(run(X[:B]), alone[:B])
        finally:
            torch.set_num_threads(2)


@needs_native
def test_c_structs_match_their_ctypes_mirrors(native):
    import ctypes

    out = (ctypes.c_int64 * 64)()
    n = native.struct_layout(out)
    assert list(out[:n]) == kernels.struct_layout()


def test_disabled_by_environment(fresh_state, monkeypatch):
    monkeypatch.setenv("LLM_KERNELS", "torch")
    assert kernels.matvec() is None
    assert kernels.status() == kernels.KernelStatus(False, "torch kernels (LLM_KERNELS=torch)")


def test_unknown_choice_is_reported(fresh_state, monkeypatch):
    monkeypatch.setenv("LLM_KERNELS", "fast")
    assert kernels.matvec() is None
    assert "LLM_KERNELS='fast'" in kernels.status().detail


def test_a_failing_compiler_is_reported_not_raised(fresh_state, monkeypatch):
    if kernels._unsupported_reason() not in (None,):
        pytest.skip("this machine cannot build the kernels at all")
    monkeypatch.setenv("CC", "false")  # exits 1 without output
    assert kernels.matvec() is None
    detail = kernels.status().detail
    assert detail.startswith("torch kernels (native ones unavailable: false failed")
    assert not list((kernels.cache_dir()).glob("*.so"))  # nothing half-built left in the cache


def test_no_compiler_is_reported(fresh_state, monkeypatch):
    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    monkeypatch.setattr(kernels.Path, "read_text", lambda self, **kw: "flags\t: avx2 fma f16c\n")
    monkeypatch.setattr(kernels.sys, "platform", "linux")
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    assert kernels.matvec() is None
    assert "no C compiler found" in kernels.status().detail


def test_other_cpus_are_reported(fresh_state, monkeypatch):
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    assert kernels.matvec() is None
    assert "built for x86-64 Linux" in kernels.status().detail


@needs_native
def test_the_library_is_built_once_and_reused(fresh_state):
    assert kernels.matvec() is not None
    built = list(kernels.cache_dir().glob("kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels._STATE = None
    assert kernels.matvec() is not None
    assert built[0].stat().st_mtime_ns == stamp


def test_the_isa_is_the_best_the_cpu_has_unless_forced():
    avx2, avx512 = frozenset(kernels.ISAS["avx2"][1]), frozenset(kernels.ISAS["avx512"][1])
    assert kernels.choose_isa(avx512, "auto") == ("avx512", None)
    assert kernels.choose_isa(avx512, "AVX2") == ("avx2", None)
    assert kernels.choose_isa(avx2, "auto") == ("avx2", None)
    assert kernels.choose_isa(avx2, "avx512") == (None, "LLM_ISA=avx512 but this CPU lacks avx512f, avx512bw, avx512vl, avx512_vnni")
    assert kernels.choose_isa(avx2 - {"fma"}, "auto") == (None, "this CPU lacks fma")
    assert "LLM_ISA='sse'" in kernels.choose_isa(avx512, "sse")[1]


def test_forcing_avx512_on_a_cpu_without_it_is_reported(fresh_state, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset(kernels.ISAS["avx2"][1]))
    monkeypatch.setattr(kernels.sys, "platform", "linux")
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("LLM_ISA", "avx512")
    assert kernels.matvec() is None
    assert kernels.status().detail == ("torch kernels (native ones unavailable: LLM_ISA=avx512 but this CPU lacks "
                                       "avx512f, avx512bw, avx512vl, avx512_vnni)")


@needs_native
def test_each_isa_is_built_once_and_named(fresh_state, monkeypatch):
    isas = kernels.runnable_isas()
    for isa in isas:
        monkeypatch.setenv("LLM_ISA", isa)
        kernels._STATE = None
        assert kernels.matvec() is not None
        assert kernels.status().detail == f"native {kernels.ISAS[isa][2]} kernels"
    assert sorted(p.name.split("-")[1] for p in kernels.cache_dir().glob("kernels-*.so")) == sorted(isas)


@pytest.mark.skipif(len(kernels.runnable_isas()) < 2, reason="this CPU runs one instruction set")
def test_q8_products_are_bitwise_the_same_in_every_isa(monkeypatch):
    """VNNI's dot product gives the same int32 sums as AVX2's two instructions, so int8 x Q8 and int4 x Q8
    products (unlike float ones, whose wider sums round apart) do not depend on the build."""
    g = torch.Generator().manual_seed(6)
    X = torch.randn(5, 256, generator=g)
    q = torch.randint(-128, 128, (37, 256), generator=g, dtype=torch.int8)
    scale = torch.rand(37, generator=g) / 100
    _, packed, s4, z4, _, bias, _ = int4_case((37, 256), 64, seed=7)
    results = []
    for isa in kernels.runnable_isas():
        monkeypatch.setenv("LLM_ISA", isa)
        monkeypatch.setattr(kernels, "_STATE", None)
        mv = kernels.matvec()
        assert mv is not None, kernels.status().detail
        results.append((mv.int8(q, scale, X, bias, q8=True), mv.int4(packed, s4, z4, 64, X, bias)))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def int4_case(shape, group, seed):
    """Random int4 codes packed as quant stores them (low nibble = even column), bf16 group scales/zeros,
    and the exact dequantized weight in float64."""
    g = torch.Generator().manual_seed(seed)
    N, K = shape
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scale = (torch.rand(N, K // group, generator=g) / 10).to(torch.bfloat16)
    zero = (torch.randn(N, K // group, generator=g) / 10).to(torch.bfloat16)
    x, bias = torch.randn(K, generator=g), torch.randn(N, generator=g)
    w = (codes.double() - 8) * scale.double().repeat_interleave(group, 1) + zero.double().repeat_interleave(group, 1)
    return codes, packed, scale, zero, x, bias, w


def q8_error_bound(w: torch.Tensor, x: torch.Tensor) -> float:
    """Largest |error| of w @ x when x is rounded per block of 32 to int8: half a step (max|x_b| / 127) per input."""
    step = x.abs().view(-1, 32).amax(-1).repeat_interleave(32) / 127
    return ((w.abs() @ (step.double() / 2)).max() * 1.001 + 1e-4).item()


@needs_native
@pytest.mark.parametrize("q8", [False, True])
@pytest.mark.parametrize("shape", [(1027, 576), (7, 32), (3072, 1536), (5, 579)])
def test_int8_matvec(shape, q8, native):
    """Float activations: the exact product to fp32 rounding; Q8 activations: within their rounding."""
    g = torch.Generator().manual_seed(3)
    N, K = shape
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) / 100
    x, bias = torch.randn(K, generator=g), torch.randn(N, generator=g)
    w = q.double() * scale.double()[:, None]
    if q8 and K % 32:
        with pytest.raises(ValueError, match="multiple of 32"):
            native.int8(q, scale, x, q8=True)
        return
    err = (native.int8(q, scale, x, bias, q8=q8).double() - (w @ x.double() + bias.double())).abs().max().item()
    assert err <= (q8_error_bound(w, x) if q8 else 1e-5 * (w.abs() @ x.double().abs()).max().item())
    with pytest.raises(ValueError, match="scale must be fp32"):
        native.int8(q, scale.double(), x, q8=q8)


@needs_native
@pytest.mark.parametrize("shape,group", [((1027, 576), 32), ((64, 1536), 128), ((5, 256), 256), ((96, 576), 64)])
def test_int4_q8_matvec_is_within_the_activation_rounding(shape, group, native):
    codes, packed, scale, zero, x, bias, w = int4_case(shape, group, seed=4)
    got = native.int4(packed, scale, zero, group, x, bias)
    # Only the (code - 8) * scale part sees rounded activations; the zero part uses exact sums of x.
    wq = (codes.double() - 8) * scale.double().repeat_interleave(group, 1)
    assert (got.double() - (w @ x.double() + bias.double())).abs().max().item() <= q8_error_bound(wq, x)
