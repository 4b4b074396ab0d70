"""`llm chat` and core.tasks.chat.ChatSession on a tiny random Llama with a tiny byte-level BPE tokenizer.

The tiny model's output head is arranged so greedy decoding never picks a special token (so never EOS), a
newline or a partial UTF-8 byte: answers are one printable line, and a long answer really is long.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llm_torch.core.tasks.chat import ChatNotice, ChatSession, ChatSettings
from llm_torch.core.engine.slots import common_prefix
from llm_torch.core.engine.runner import NativeRunner, TorchRunner
from llm_torch.core.errors import InputError
from llm_torch.core.engine.events import GenerationEvent
from llm_torch.core.placement.loading import load_model
from llm_torch.core.tokenizer import Tokenizer

from tiny import LLAMA_BASE, hf_model
from tests.templates import GEMMA_TEMPLATE, LLAMA2_TEMPLATE

transformers = pytest.importorskip("transformers")

LLM = shutil.which("llm") or os.path.join(os.path.dirname(sys.executable), "llm")
SPECIALS = ["<unk>", "<s>", "</s>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
# SmolLM2's template (ChatML with a default system); Llama 2's and Gemma's come from tests/templates.py.

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STYLES = {  # tokenizer_config.json per template
    "chatml": dict(chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>", bos_token=None),
    "llama2": dict(chat_template=LLAMA2_TEMPLATE, eos_token="</s>", bos_token="<s>"),
    "gemma": dict(chat_template=GEMMA_TEMPLATE, eos_token="<eos>", bos_token="<bos>"),
}
_TEXT = [
    "The quick brown fox jumps over the lazy dog.", "Hello there! How are you today? I am fine, thanks.",
    "Tell me a story about a dragon and a castle.", "Why is the sky blue? Because of Rayleigh scattering.",
    "Once upon a time, in a land far away, there lived a wise old king.", "def main():\n    return 42\n",
] * 10


def _tokenizer_json(path: Path) -> int:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_TEXT, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path))
    return tok.get_vocab_size()


def _write_style(folder: Path, style: str) -> None:
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **STYLES[style]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A ChatML chat model folder (context 8192) plus `small/`, the same weights with a 96-token context."""
    root = tmp_path_factory.mktemp("tiny-chat")
    folder = root / "model"
    folder.mkdir()
    vocab = _tokenizer_json(folder / "tokenizer.json")
    _write_style(folder, "chatml")
    tok = Tokenizer.from_folder(folder)
    eos = tok.token_to_id("<|im_end|>")
    cfg = dict(LLAMA_BASE, vocab_size=vocab, max_position_embeddings=8192, bos_token_id=None,
               eos_token_id=eos, pad_token_id=None)
    model = hf_model(cfg)
    with torch.no_grad():
        # Rows of unwanted tokens are zero (logit 0); the others come in +w/-w pairs spanning the hidden
        # space, so some logit is always > 0 and greedy decoding never picks an unwanted token.
        head = model.lm_head.weight
        bad = {i for i in range(vocab) if tok.id_to_token(i) in SPECIALS}
        bad |= {i for i in range(vocab) if not tok.decode([i]).isprintable() or "\ufffd" in tok.decode([i])}
        good = [i for i in range(vocab) if i not in bad]
        head[sorted(bad)] = 0.0
        for a, b in zip(good[0::2], good[1::2]):
            head[b] = -head[a]
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)  # greedy by default
    small = root / "small"
    small.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (small / name).symlink_to(folder / name)
    config = json.loads((folder / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    for style in ("llama2", "gemma"):
        (root / style).mkdir()
        (root / style / "tokenizer.json").symlink_to(folder / "tokenizer.json")
        _write_style(root / style, style)
    return root


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir / "model"), dtype="float32")


@pytest.fixture(scope="module")
def small(tiny_dir):
    return load_model(str(tiny_dir / "small"), dtype="float32")


def run_turn(turn) -> tuple[str, list]:
    events = list(turn)
    return "".join(e.text for e in events if isinstance(e, GenerationEvent)), events


# ---- KV cache reuse ---------------------------------------------------------------------------------


def test_each_turn_prefills_only_its_new_tokens(tiny, monkeypatch):
    session = ChatSession(tiny.model, tiny.tokenizer, system="Be brief.", settings=ChatSettings(max_new_tokens=12))
    fed = []  # tokens of each forward step: the engine's runner itself, instrumented
    for cls in (NativeRunner, TorchRunner):
        monkeypatch.setattr(cls, "forward", lambda self, cache, segments, _run=cls.forward:
                            fed.append(sum(len(s.tokens) for s in segments)) or _run(self, cache, segments))
    previous: list[int] = []  # what the cache holds after a turn: prompt + fed-back answer tokens
    prev_prompt: list[int] = []
    for n, text in enumerate(["Hello there!", "Tell me a story about a dragon.", "Why is the sky blue?",
                              "And the fox?", "Thanks, bye."], start=1):
        ids = session.prompt_ids(session._messages + [{"role": "user", "content": text}])
        fed.clear()
        answer, _ = run_turn(session.send(text))
        info = session.last_turn
        new = len(ids) - min(common_prefix(ids, previous), len(ids) - 1)
        assert info.conversation_tokens == len(ids)
        assert info.prefilled_tokens == info.timings.prompt_tokens - info.timings.cached_tokens == new
        # What the model really ran: the prefill, then one token per decode step after the first.
        assert sum(fed) == new + info.timings.completion_tokens - 1
        if n > 1:
            assert new < len(ids) and new <= len(ids) - len(prev_prompt)  # the history is never re-run
        assert answer == info.answer and len(info.answer_token_ids) == 12
        prev_prompt = ids
        previous = ids + info.answer_token_ids[:-1]
    # The reused cache gives exactly what a fresh session computes for the same conversation.
    fresh = ChatSession(tiny.model, tiny.tokenizer, system="Be brief.", settings=ChatSettings(max_new_tokens=12))
    fresh.apply_dict({"messages": session.messages})
    run_turn(fresh.regenerate())
    assert fresh.last_turn.reused_tokens == 0
    assert fresh.last_turn.answer_token_ids == session.last_turn.answer_token_ids


def test_regen_undo_clear_and_interrupt_keep_the_cache_consistent(tiny):
    session = ChatSession(tiny.model, tiny.tokenizer, settings=ChatSettings(max_new_tokens=6))
    first, _ = run_turn(session.send("Hello there!"))
    prompt_len = session.last_turn.conversation_tokens
    again, _ = run_turn(session.regenerate())
    assert again == first and session.last_turn.prefilled_tokens == 1  # greedy; only the last prompt token re-run
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    run_turn(session.send("Why is the sky blue?"))
    assert session.undo() == "Why is the sky blue?" and len(session.messages) == 2
    # Stop an answer after 3 events: the partial answer stays, the next turn reuses the cache.
    turn = session.send("Tell me a story.")
    taken = [next(turn) for _ in range(3)]
    turn.close()
    assert session.messages[-1] == {"role": "assistant", "content": "".join(e.text for e in taken)}
    assert session.last_turn.finish_reason == "interrupted"
    run_turn(session.send("Go on."))
    assert session.last_turn.reused_tokens >= prompt_len
    # A turn closed before it started did not happen.
    session.send("never mind").close()
    assert session.messages[-1]["role"] == "assistant" and len(session.messages) == 6
    session.clear()
    assert session.messages == [] and session.context_used() == 0
    with pytest.raises(InputError, match="nothing to undo"):
        session.undo()


# ---- templates --------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": " Hello! How can I help? "},
    {"role": "user", "content": "Why is the sky blue?"},
]


@pytest.mark.parametrize("style", ["chatml", "llama2", "gemma"])
def test_rendered_prompt_matches_transformers(tiny, tiny_dir, style):
    folder = tiny_dir / ("model" if style == "chatml" else style)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    session = ChatSession(tiny.model, Tokenizer.from_folder(folder))
    session.apply_dict({"messages": CONVERSATION + [{"role": "assistant", "content": "Rayleigh."}]})
    for system in ("Be brief.", None):
        session.set_system(system)
        history = session._messages[:-1]
        expected_messages = ([{"role": "system", "content": system}] if system else []) + history
        if style == "gemma" and system:  # no system role: folded into the first user turn
            with pytest.raises(Exception, match="System role not supported"):
                ref.apply_chat_template(expected_messages, tokenize=False)
            expected_messages = [{"role": "user", "content": f"{system}\n\n{history[0]['content']}"}] + history[1:]
        expected = ref.apply_chat_template(expected_messages, tokenize=False, add_generation_prompt=True)
        assert session.render(history) == expected
        assert session.prompt_ids(history) == ref(expected, add_special_tokens=False)["input_ids"]
    marker = {"chatml": "<|im_start|>system\nBe brief.<|im_end|>", "llama2": "[INST] <<SYS>>\nBe brief.\n<</SYS>>",
              "gemma": "<start_of_turn>user\nBe brief.\n\nHi there!<end_of_turn>"}[style]
    session.set_system("Be brief.")
    assert marker in session.render()
    assert session.system_role == (style != "gemma")


def test_gemma_system_is_folded_and_said_once(tiny, tiny_dir):
    session = ChatSession(tiny.model, Tokenizer.from_folder(tiny_dir / "gemma"), system="Be brief.",
                          settings=ChatSettings(max_new_tokens=3))
    notices = [e for e in session.send("Hi")if isinstance(e, ChatNotice)]
    assert [n.kind for n in notices] == ["system_folded"]
    assert not [e for e in session.send("Again") if isinstance(e, ChatNotice)]
    assert session.status()["system_folded"]


# ---- context overflow -------------------------------------------------------------------------------


def test_overflow_drops_oldest_exchanges_and_keeps_the_system_prompt(small):
    session = ChatSession(small.model, small.tokenizer, system="Be brief.", settings=ChatSettings(max_new_tokens=8))
    assert session.context == 96
    trims = []
    for n in range(8):
        _, events = run_turn(session.send(f"Question {n}: why?"))
        trims += [e for e in events if isinstance(e, ChatNotice) and e.kind == "context_trimmed"]
        info = session.last_turn
        assert info.conversation_tokens + 8 <= 96 and len(info.answer_token_ids) == 8  # the chat goes on
        assert session.render().startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert trims and "dropped the oldest" in trims[0].message
    assert session.window_start > 0 and len(session.messages) == 1 + 16  # nothing lost from the record
    seen = session.render()
    assert "Question 0:" not in seen and "Question 7:" in seen
    with pytest.raises(InputError, match="context holds 96"):
        session.send("word " * 200)
    assert len(session.messages) == 17  # the failed turn left no trace


# ---- settings, save, load ---------------------------------------------------------------------------


def test_set_save_load(tiny, tmp_path):
    session = ChatSession(tiny.model, tiny.tokenizer, model_name="tiny", system="Be brief.",
                          settings=ChatSettings(max_new_tokens=4))
    assert session.set("temperature", "0.7") == 0.7 and session.set("top_k", "40") == 40
    assert session.set("seed", "none") is None and session.set("max-new-tokens", "5") == 5
    for key, value, match in [("temp", "1", "unknown setting"), ("top_p", "2", "top_p must be"),
                              ("top_k", "x", "whole number"), ("temperature", "nan", "finite"),
                              ("max_new_tokens", "0", ">= 1")]:
        with pytest.raises(InputError, match=match):
            session.set(key, value)
    run_turn(session.send("Hello"))
    path = session.save(tmp_path / "chat.json")
    data = json.loads(path.read_text())
    assert data["model"] == "tiny" and data["settings"]["temperature"] == 0.7 and data["settings"]["max_new_tokens"] == 5
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    other = ChatSession(tiny.model, tiny.tokenizer)
    other.load(path)
    assert other.messages == session.messages and other.settings == session.settings
    (tmp_path / "bad.json").write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}))
    with pytest.raises(InputError, match="alternate"):
        other.load(tmp_path / "bad.json")
    with pytest.raises(InputError, match="cannot read"):
        other.load(tmp_path / "missing.json")
    assert other.messages == session.messages


# ---- the command ------------------------------------------------------------------------------------


def _env(tmp_path, **extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_STATE_HOME": str(tmp_path / "state"), **extra}
    env.pop("LLM_DEBUG", None)
    env.pop("NO_COLOR", None)
    return env


def test_scripted_chat_one_answer_line_per_input_line(tiny_dir, tmp_path):
    proc = subprocess.run([LLM, "chat", "-m", str(tiny_dir / "model"), "-n", "5"], input=b"hi\n\nthere\n",
                          capture_output=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().split("\n")
    assert len(lines) == 3 and lines[2] == "" and all(lines[:2]), lines  # two answers, nothing else
    assert not (tmp_path / "state").exists()  # no input history for scripts


def test_scripted_overflow_and_commands(tiny_dir, tmp_path):
    script = "/set max_new_tokens 8\n" + "".join(f"Question {n}: why?\n" for n in range(8)) + "/save out.json\n"
    proc = subprocess.run([LLM, "chat", str(tiny_dir / "small"), "-s", "Be brief."], input=script.encode(),
                          capture_output=True, env=_env(tmp_path), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout.decode().splitlines()) == 8
    err = proc.stderr.decode()
    assert "max_new_tokens = 8" in err and "dropped the oldest" in err
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["messages"][0] == {"role": "system", "content": "Be brief."} and len(saved["messages"]) == 17
    resumed = subprocess.run([LLM, "chat", str(tiny_dir / "small"), "--resume", "out.json", "-n", "9"],
                             input=b"/set\n/status\n", capture_output=True, env=_env(tmp_path), cwd=tmp_path, timeout=120)
    err = resumed.stderr.decode()
    assert resumed.returncode == 0 and resumed.stdout == b"", err
    assert "max_new_tokens=9" in err and "messages: 16" in err and "system prompt: Be brief." in err  # flags win
    bad = subprocess.run([LLM, "chat", str(tiny_dir / "small"), "-m", "other"], input=b"hi\n",
                         capture_output=True, env=_env(tmp_path), timeout=60)
    assert bad.returncode == 1 and bad.stderr.decode().startswith("error: two models given")


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|[\x01\x02]")


class Screen:
    """What the terminal showed, escape codes removed; `terminal` (tests/terminal.py) follows all of it."""

    def __init__(self, child):
        from tests.terminal import Terminal

        self.child = child
        self.raw = ""
        self.terminal = Terminal(*child.getwinsize())

    def expect(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = ANSI.sub("", self.raw)
            if re.search(pattern, text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen:\n{text[-3000:]}")
            self._read(f"before {pattern!r}")

    def until(self, check, timeout: float = 60) -> None:
        """Read until check(terminal) holds."""
        deadline = time.monotonic() + timeout
        while not check(self.terminal):
            if time.monotonic() > deadline:
                raise AssertionError("the screen never got there:\n" + "\n".join(self.terminal.lines()[-40:]))
            self._read("")

    def pump(self, seconds: float) -> None:
        """Keep reading for a while, as a terminal does (a writer blocked on a full pty is not a user's case)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._read("")

    def _read(self, what: str) -> None:
        try:
            chunk = self.child.read_nonblocking(65536, timeout=0.2)
        except Exception as e:  # pexpect.TIMEOUT: nothing yet; EOF: the process ended
            if type(e).__name__ == "EOF":
                raise AssertionError(f"llm exited {what}:\n{ANSI.sub('', self.raw)[-3000:]}") from None
            return
        self.raw += chunk
        self.terminal.feed(chunk)

    def mark(self) -> None:
        """Forget what was shown so far (the next expect looks at new output only)."""
        self.raw = ""

    def interrupt_at_prompt(self) -> None:
        """Ctrl-C once the prompt waits for keys: CPython's readline misses a signal that comes between
        drawing the prompt and waiting (no person is that fast)."""
        self.pump(0.5)
        self.child.sendintr()


def test_interactive_session_in_a_pseudo_terminal(tiny_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = _env(tmp_path, TERM="xterm-256color", COLUMNS="100", LINES="30")
    child = pexpect.spawn(LLM, ["chat", str(tiny_dir / "model"), "-n", "8", "--stats"], env=env, cwd=str(tmp_path),
                          encoding="utf-8", dimensions=(30, 100), timeout=60)
    screen = Screen(child)
    try:
        screen.expect(r"/help for commands")
        screen.expect(r">>> ")
        for text in ("Hello there!", "Tell me a story."):
            screen.mark()
            child.sendline(text)
            screen.expect(r"prefill: \d+ tok[^\n]*\n(.|\n)*>>> ")
        screen.mark()
        child.sendline("/set temperature 0.5")
        screen.expect(r"temperature = 0\.5\s+>>> ")
        screen.mark()
        child.sendline("/save chat.json")
        screen.expect(r"saved 4 messages to chat\.json\s+>>> ")
        saved = json.loads((tmp_path / "chat.json").read_text())
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
        assert saved["messages"][2]["content"] == "Tell me a story." and saved["settings"]["temperature"] == 0.5
        screen.mark()
        child.sendline("/nope")
        screen.expect(r"error: unknown command /nope.*\n>>> ")
        # A long answer, stopped with Ctrl-C: the session goes on and keeps the partial answer.
        child.sendline("/set max_new_tokens 8000")
        screen.expect(r"max_new_tokens = 8000")
        screen.mark()
        child.sendline("Write a very long story.")
        screen.expect(r"Write a very long story\.\r?\n…")  # the answer has started
        time.sleep(1.0)
        child.sendintr()
        screen.expect(r"\(interrupted\)(.|\n)*>>> ")
        screen.mark()
        child.sendline("/status")
        text = screen.expect(r"settings: .*\n(.|\n)*>>> ")
        assert "messages: 6" in text and re.search(r"context: \d+ of 8192 tokens used", text)
        child.sendline("/save chat.json")
        screen.expect(r"saved 6 messages")
        saved = json.loads((tmp_path / "chat.json").read_text())
        partial = saved["messages"][-1]["content"]
        assert saved["messages"][-2]["content"] == "Write a very long story." and partial
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=30)
        child.close()
        assert child.exitstatus == 0
        assert (tmp_path / "state" / "llm-torch" / "chat_history").read_text().count("/save chat.json") == 2
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_multi_line_ctrl_d_then_ctrl_c_at_the_prompt_exits_cleanly(tiny_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(LLM, ["chat", str(tiny_dir / "model"), "-n", "4"], env=_env(tmp_path, NO_COLOR="1"),
                          cwd=str(tmp_path), encoding="utf-8", dimensions=(24, 80), timeout=60)
    screen = Screen(child)
    try:
        screen.expect(r">>> ")
        child.sendline("/multi")
        screen.expect(r"\.\.\. ")
        child.sendline("first line")
        child.sendline("second line")
        screen.expect(r"second line\r?\n\.\.\. ")
        screen.mark()
        child.sendcontrol("d")  # ends the multi-line message (as a line holding /end does)
        screen.expect(r">>> ")  # answered, back at the prompt
        child.sendline("/save multi.json")
        screen.expect(r"saved 2 messages.*\n>>> ")
        screen.interrupt_at_prompt()  # Ctrl-C twice at the prompt: a clean exit
        screen.expect(r"Ctrl-C again to quit[^\n]*\n>>> ")
        screen.interrupt_at_prompt()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0 and "Traceback" not in screen.raw + child.before
        saved = json.loads((tmp_path / "multi.json").read_text())
        assert saved["messages"][0]["content"] == "first line\nsecond line"
    finally:
        if child.isalive():
            child.terminate(force=True)


def _answer_rows(lines: list[str], message: str) -> list[str]:
    """The rows of the answer to `message` on the final screen: after its prompt line, up to the next prompt
    or note."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f">>> {message}"))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith((">>>", "(")):
            break
        rows.append(line)
    return rows


def _rendered(answer: str, width: int) -> list[str]:
    """The answer as Markdown at `width` columns, as plain rows."""
    import io

    from rich.console import Console
    from rich.markdown import Markdown

    from llm_torch.cli.chat_view import markdown_source

    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    console.print(Markdown(markdown_source(answer)))
    return [line.rstrip() for line in console.file.getvalue().split("\n")[:-1]]


def test_each_answer_is_shown_once_and_ctrl_c_after_it_keeps_the_conversation(tiny_dir, tmp_path):
    """Answers taller than the screen, keys typed while one streams, Ctrl-C in one, then Ctrl-C at the prompt."""
    pexpect = pytest.importorskip("pexpect")
    env = _env(tmp_path, TERM="xterm-256color")
    for name in ("COLUMNS", "LINES"):
        env.pop(name, None)
    child = pexpect.spawn(LLM, ["chat", str(tiny_dir / "model"), "-n", "900"], env=env, cwd=str(tmp_path),
                          encoding="utf-8", dimensions=(24, 80), timeout=60)
    screen = Screen(child)
    try:
        screen.expect(r">>> ")
        child.sendline("Hello there!")
        screen.expect(r"Hello there!\r?\n…")
        child.send("zqxj")  # typed while the answer streams: not echoed into it, waiting at the next prompt
        screen.expect(r"\(stopped after 900 tokens[^\n]*\n>>> zqxj", timeout=120)
        child.sendcontrol("u")
        child.sendline("/set max_new_tokens 8000")
        screen.expect(r"max_new_tokens = 8000")
        child.sendline("Write a very long story.")
        screen.expect(r"Write a very long story\.\r?\n…")
        # A screenful below the message, then more.
        screen.until(lambda terminal: "".join(terminal.screen[0]).startswith(">>> Write a very long story."))
        screen.pump(1.0)
        child.sendintr()
        screen.expect(r"\(interrupted\)(.|\n)*>>> ")
        screen.mark()
        screen.interrupt_at_prompt()  # just after an answer: the session goes on
        screen.expect(r"Ctrl-C again to quit[^\n]*\n>>> ")
        child.sendline("/save kept.json")
        screen.expect(r"saved 4 messages[^\n]*\n>>> ")
        screen.mark()
        screen.interrupt_at_prompt()
        screen.expect(r"Ctrl-C again to quit[^\n]*\n>>> ")
        screen.interrupt_at_prompt()
        child.expect(pexpect.EOF, timeout=30)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)
    screen.terminal.feed(child.before or "")
    lines = screen.terminal.lines()
    messages = json.loads((tmp_path / "kept.json").read_text())["messages"]
    assert messages[2]["content"] == "Write a very long story." and messages[3]["content"]
    for message, answer in ((messages[0]["content"], messages[1]["content"]), (messages[2]["content"], messages[3]["content"])):
        rows = _answer_rows(lines, message)
        assert len(rows) > 24, rows  # taller than the screen
        assert rows == _rendered(answer, 79), "\n".join(rows)  # every row once, none lost, no typed keys
    assert not any("zqxj" in line for line in lines)  # shown at the prompt only, then erased there with Ctrl-U


def test_markdown_view_prints_each_settled_block_once(monkeypatch):
    """Streamed a few characters at a time with a redraw after each, an answer of several blocks (a code block
    with blank lines, a list, a paragraph taller than the screen) ends on the screen as its one-shot rendering."""
    import io

    from rich.console import Console

    from llm_torch.cli import chat_view
    from tests.terminal import Terminal

    text = ("A first paragraph, long enough to wrap over a few rows of a narrow screen. " * 3 + "\n\n"
            "```python\ndef f(x):\n    return x + 1\n\n\nprint(f(2))\n```\n\n"
            "- one item\n- another item\n\n" + "The last paragraph keeps going. " * 40)
    out = io.StringIO()
    console = Console(file=out, width=60, height=12, force_terminal=True, color_system="standard")
    clock = iter(range(10**6))
    monkeypatch.setattr(chat_view.time, "perf_counter", lambda: float(next(clock)))  # every piece redraws
    with chat_view.MarkdownView(console) as view:
        for i in range(0, len(text), 7):
            view.add(text[i:i + 7])
    terminal = Terminal(12, 60)
    terminal.feed(out.getvalue().replace("\n", "\r\n"))  # what the terminal's driver does (ONLCR)
    assert terminal.lines() == _rendered(text, 59)
    assert chat_view.settled_end("para\n\n```\ncode\n\nmore") == len("para\n\n")  # never inside a code block
