"""Absurd sizes in a config.json, params.json or GGUF header, and hostile chat templates: each is one typed
error, quickly, with bounded memory. The hostile cases run in a subprocess under an address-space limit and
a timeout, so a regression fails the test instead of hanging or swapping the machine."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_torch.core.errors import LLMError
from llm_torch.core.model.config import ModelConfig

MEMORY_LIMIT = 3 << 30  # bytes of address space; torch's import alone takes ~1 GiB of it
TIMEOUT_S = 120


def _run_limited(code: str) -> dict:
    """Run `code` (which fills a dict `results`: case -> [error type, message, seconds]) under the limits."""
    prelude = textwrap.dedent(f"""
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
        results = {{}}
        def attempt(case, f):
            start = time.monotonic()
            try:
                f()
                results[case] = ["no error", "", time.monotonic() - start]
            except BaseException as e:
                results[case] = [type(e).__name__, str(e), time.monotonic() - start]
    """)
    done = "\nprint(json.dumps(results))\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + done], capture_output=True,
                          text=True, timeout=TIMEOUT_S, env={**os.environ, "LLM_DEBUG": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- configs

ABSURD_CONFIGS = {
    "layers": ({"num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000 is outside the sane range 1..4096"),
    "negative vocab": ({"vocab_size": -1}, "vocab_size = -1 is outside"),
    "hidden": ({"hidden_size": 10**12}, "hidden_size = 1000000000000 is outside"),
    "infinite hidden": ({"hidden_size": float("inf")}, "hidden_size = inf is not an integer"),
    "heads": ({"num_attention_heads": 0}, "num_attention_heads = 0 is outside"),
    "kv heads": ({"num_key_value_heads": 10**9}, "num_key_value_heads = 1000000000 is outside"),
    "head_dim": ({"head_dim": 10**8}, "head_dim = 100000000 is outside"),
    "intermediate": ({"intermediate_size": 2**40}, "intermediate_size = 1099511627776 is outside"),
    "context": ({"max_position_embeddings": 10**15}, "max_position_embeddings = 1000000000000000 is outside"),
    "window": ({"sliding_window": 10**12}, "sliding_window = 1000000000000 is outside"),
    "rope factor": ({"rope_scaling": {"rope_type": "linear", "factor": 1e300}}, "factor = 1e+300 is not a number"),
    "rope theta": ({"rope_theta": float("nan")}, "rope_theta = nan is not a number"),
    "scaled context": ({"max_position_embeddings": 1 << 24, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
                       "claims a context of 134217728 tokens"),
}


def test_absurd_config_sizes_are_config_errors_before_anything_is_built():
    cases = {f"{family} {name}": {"model_type": family, **fields}
             for name, (fields, _) in ABSURD_CONFIGS.items() for family in ("llama", "gemma2")}
    results = _run_limited(f"""
        from llm_torch.core.model.config import ModelConfig
        for case, raw in json.loads({json.dumps(cases)!r}).items():  # JSON spells inf and nan too
            attempt(case, lambda: ModelConfig.from_dict(raw))
    """)
    for case, (kind, message, seconds) in results.items():
        expected = ABSURD_CONFIGS[case.split(" ", 1)[1]][1]
        assert kind == "ConfigError" and expected in message and seconds < 1.0, (case, kind, message)


def test_params_json_sizes_are_bounded():
    from llm_torch.core.checkpoint.meta import config_from_params
    from llm_torch.core.errors import ConfigError

    base = {"dim": 64, "n_layers": 2, "n_heads": 4}
    for bad, expected in (({"n_layers": 10**9}, "params.json n_layers = 1000000000 is outside"),
                          ({"multiple_of": 0}, "params.json multiple_of = 0 is outside"),
                          ({"dim": "big"}, "params.json dim = 'big' is not an integer"),
                          ({"ffn_dim_multiplier": float("inf")}, "ffn_dim_multiplier = inf is not a number")):
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
            config_from_params({**base, **bad}, 256)


# Values that are nearly right, far off, or of the wrong type, for the fields a config.json sizes things with.
_SIZE = st.one_of(st.integers(-2, 300), st.integers(-(10**20), 10**20), st.floats(allow_nan=True),
                  st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(0, 4), max_size=3))
_CONFIG = st.fixed_dictionaries(
    {"model_type": st.sampled_from(["llama", "gemma2"])},
    optional={
        "vocab_size": _SIZE, "hidden_size": _SIZE, "intermediate_size": _SIZE, "num_hidden_layers": _SIZE,
        "num_attention_heads": _SIZE, "num_key_value_heads": _SIZE, "head_dim": _SIZE,
        "max_position_embeddings": _SIZE, "sliding_window": _SIZE, "rope_theta": _SIZE, "rms_norm_eps": _SIZE,
        "layer_types": st.one_of(_SIZE, st.lists(st.sampled_from(["full_attention", "sliding_attention", "x"]),
                                                 max_size=4)),
        "rope_scaling": st.one_of(st.none(), _SIZE, st.fixed_dictionaries(
            {"rope_type": st.sampled_from(["linear", "dynamic", "yarn", "llama3", "default", "bogus"])},
            optional={"factor": _SIZE, "original_max_position_embeddings": _SIZE, "low_freq_factor": _SIZE,
                      "high_freq_factor": _SIZE})),
        "eos_token_id": _SIZE, "id2label": st.one_of(_SIZE, st.dictionaries(st.text(max_size=2), st.text(max_size=2))),
    },
)


@settings(max_examples=50, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(_CONFIG)
def test_any_config_dict_is_a_valid_config_or_a_typed_error(raw):
    try:
        config = ModelConfig.from_dict(raw)
    except LLMError as e:
        assert "\n" not in e.message
        return
    assert 1 <= config.num_hidden_layers <= 4096 and len(config.layer_types) == config.num_hidden_layers
    assert 1 <= config.vocab_size and 1 <= config.head_dim <= 4096


# --------------------------------------------------------------------------------------------- GGUF

def _gguf_bytes(tensor_count: int, kvs: bytes, kv_count: int, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count) + kvs + tail


def _gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def test_absurd_gguf_headers_are_checkpoint_errors(tmp_path):
    files = {
        "tensor count": _gguf_bytes(10**18, b"", 0),
        "kv count": _gguf_bytes(0, b"", 10**18),
        # a string array claiming 10^15 entries
        "array length": _gguf_bytes(0, _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 10**15), 1),
        # one tensor info: 2 dims of 2^40 x 2^40 F32 elements
        "tensor shape": _gguf_bytes(1, b"", 0, _gguf_string("token_embd.weight")
                                    + struct.pack("<IQQIQ", 2, 1 << 40, 1 << 40, 0, 0)),
        "tensor dims": _gguf_bytes(1, b"", 0, _gguf_string("token_embd.weight") + struct.pack("<I", 10**9)),
    }
    for name, data in files.items():
        (tmp_path / f"{name}.gguf").write_bytes(data + b"\0" * 64)
    results = _run_limited(f"""
        from llm_torch.core.checkpoint.gguf_reader import open_gguf
        for name in {list(files)!r}:
            attempt(name, lambda: open_gguf({str(tmp_path)!r} + "/" + name + ".gguf"))
    """)
    expected = {"tensor count": "tensor_count 1000000000000000000 needs at least",
                "kv count": "kv_count 1000000000000000000 needs at least",
                "array length": "array length 1000000000000000 needs at least",
                "tensor shape": "'token_embd.weight' has shape [1099511627776, 1099511627776]",
                "tensor dims": "'token_embd.weight' has 1000000000 dims, not 1..4"}
    for name, (kind, message, seconds) in results.items():
        assert kind == "CheckpointError" and expected[name] in message and seconds < 5, (name, kind, message)


def _write_llama_gguf(path, block_count: int, tensors: bool) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, block_count), (w.add_context_length, 256), (w.add_embedding_length, 64),
                       (w.add_feed_forward_length, 128), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-6)):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(32)])
    if tensors:
        w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
        w.add_tensor("blk.1.attn_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_block_count_is_checked_against_bounds_and_tensors(tmp_path):
    _write_llama_gguf(tmp_path / "meta-only.gguf", 10**9, tensors=False)
    _write_llama_gguf(tmp_path / "two-layers.gguf", 10**3, tensors=True)
    results = _run_limited(f"""
        from pathlib import Path
        from llm_torch.core.checkpoint.gguf import GGUFCheckpoint
        for name in ("meta-only", "two-layers"):
            attempt(name, lambda: GGUFCheckpoint(Path({str(tmp_path)!r}) / (name + ".gguf")))
    """)
    kind, message, seconds = results["meta-only"]
    assert kind == "ConfigError" and "llama.block_count = 1000000000 is outside the sane range" in message
    kind, message, seconds = results["two-layers"]
    assert kind == "CheckpointError" and "llama.block_count = 1000, but the file holds tensors for 2 layers" in message


# ------------------------------------------------------------------------------------------ templates

HOSTILE_TEMPLATES = {
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "ran past its time budget"),
    "nested loops printing": ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                              "ran past its time budget"),
    "nested string loops": ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
                            "ran past its time budget"),
    "exponential macro": ("{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(60) }}",
                          "ran past its time budget"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}", "past the budget of 33554432"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s }}", "past the budget of 33554432"),
    "multiplication": ("{{ 'x' * 10**10 }}", "multiplies a value of 1 by 10000000000"),
    "list multiplication": ("{{ (messages * 10**9) | length }}", "multiplies a value of 1 by 1000000000"),
    "power": ("{{ 2 ** 100000000 }}", "raises 2 to the power 100000000"),
    "filter width": ("{{ 'x' | center(10**10) }}", "passed 10000000000 to a call"),
    "method width": ("{{ 'x'.ljust(10**10) }}", "passed 10000000000 to a call"),
    "percent width": ("{{ '%0999999999d' % 1 }}", "formats with a width past the size budget"),
    "format width": ("{{ '{:>999999999}'.format(1) }}", "formats with a width past the size budget"),
    "range": ("{{ range(10**9) | list | length }}", "passed 1000000000 to a call"),
    "recursion": ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "recursed too deeply"),
    "lipsum": ("{{ lipsum(10**6) }}", "chat template failed"),
}


def test_hostile_templates_are_tokenizer_errors_within_bounds():
    results = _run_limited(f"""
        from llm_torch.core.tokenizer import chat_template
        chat_template.TIME_BUDGET_S = 0.5  # the default (2 s) is checked by the same code; keep the test short
        for name, (source, _) in {HOSTILE_TEMPLATES!r}.items():
            attempt(name, lambda: chat_template.render(source, [{{"role": "user", "content": "hi"}}], True, {{}}))
    """)
    for name, (kind, message, seconds) in results.items():
        assert kind == "TokenizerError" and HOSTILE_TEMPLATES[name][1] in message and seconds < 3, (name, kind, message)


def test_legitimate_templates_render_as_the_plain_sandbox_does():
    """The bounds change no output: Llama 2, Gemma and a tool-using template on a long conversation."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from llm_torch.core.tokenizer import chat_template
    from templates import GEMMA_TEMPLATE, LLAMA2_TEMPLATE

    tool_template = (
        "{% if tools %}{% for t in tools %}{{ t | tojson(indent=2) }}\n{% endfor %}{% endif %}"
        "{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>' }}{% if m.tool_calls %}{% for c in m.tool_calls %}"
        "{{ c.function.name }}({{ c.function.arguments | tojson }}){% endfor %}{% else %}{{ m['content'] | trim }}"
        "{% endif %}{{ '%s/%d' % (loop.index, loop.length) }}{{ '{}\n'.format(loop.last) }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    messages = []
    for i in range(300):
        messages.append({"role": "user", "content": f"question {i} " * 20})
        messages.append({"role": "assistant", "content": f" answer {i} " * 30})
    with_calls = [dict(m, tool_calls=[{"function": {"name": "f", "arguments": {"x": i}}}]) if i % 4 == 1 else m
                  for i, m in enumerate(messages)]
    tools = [{"name": f"tool{i}", "parameters": {"type": "object"}} for i in range(10)]
    plain_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[jinja2.ext.loopcontrols])
    plain_env.filters["tojson"] = chat_template._tojson
    variables = {"bos_token": "<s>", "eos_token": "</s>"}
    for source, msgs, extra in ((LLAMA2_TEMPLATE, messages, {}), (GEMMA_TEMPLATE, messages, {}),
                                (tool_template, with_calls, {"tools": tools})):
        want = plain_env.from_string(source).render(messages=msgs, add_generation_prompt=True, **variables, **extra)
        assert chat_template.render(source, msgs, True, {**variables, **extra}) == want
