"""Samplers on hand-made logits, checked against transformers' processors of the same name."""

import math

import pytest
import torch

from llm_torch.core.errors import InputError
from llm_torch.core.engine.sampling import Sampler, SamplingSpec, apply_frequency_presence, apply_repetition_penalty, min_p_filter, process_logits, top_k_filter, top_p_filter

NEG = float("-inf")


def kept(logits):
    return (logits != NEG).nonzero()[:, 1].tolist() if logits.dim() == 2 else None


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.5]])
    assert kept(top_k_filter(logits, 2)) == [1, 2, 3]
    assert kept(top_k_filter(logits, 1)) == [1]
    assert kept(top_k_filter(logits, 0)) == [0, 1, 2, 3, 4]


def test_top_p_edges():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.5)) == [0]  # exactly reaching p keeps the boundary token out
    assert kept(top_p_filter(logits, 0.51)) == [0, 1]
    assert kept(top_p_filter(logits, 0.8)) == [0, 1]
    assert kept(top_p_filter(logits, 0.81)) == [0, 1, 2]
    assert kept(top_p_filter(logits, 1e-9)) == [0]  # the best token always survives
    assert kept(top_p_filter(logits, 1.0)) == [0, 1, 2, 3]


def test_min_p():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    assert kept(min_p_filter(probs.log(), 0.2)) == [0, 1]  # threshold 0.12
    assert kept(min_p_filter(probs.log(), 0.0)) == [0, 1, 2, 3]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize(
    "spec",
    [
        SamplingSpec(temperature=0.7, top_k=5),
        SamplingSpec(temperature=1.3, top_p=0.8),
        SamplingSpec(temperature=0.9, min_p=0.1),
        SamplingSpec(temperature=1.0, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    ],
)
def test_processing_matches_transformers(spec):
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    context = torch.randint(0, 50, (3, 12))
    procs = LogitsProcessorList()
    if spec.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(spec.repetition_penalty))
    procs.append(TemperatureLogitsWarper(spec.temperature))
    if spec.top_k:
        procs.append(TopKLogitsWarper(spec.top_k))
    if spec.top_p < 1.0:
        procs.append(TopPLogitsWarper(spec.top_p))
    if spec.min_p:
        procs.append(MinPLogitsWarper(spec.min_p))
    expected = procs(context, logits.clone())
    got = process_logits(logits.clone(), spec, context)
    assert torch.equal(expected == NEG, got == NEG)
    finite = expected != NEG
    assert torch.allclose(expected[finite], got[finite])


def test_greedy_is_argmax_and_seeded_runs_repeat():
    logits = torch.tensor([[0.1, 2.0, 1.9]])
    assert Sampler(SamplingSpec())(logits).tolist() == [1]
    torch.manual_seed(0)
    wide = torch.randn(1, 1000)
    a = [int(Sampler(SamplingSpec(temperature=1.0, seed=7))(wide)) for _ in range(3)]
    s = Sampler(SamplingSpec(temperature=1.0, seed=7))
    b = [int(s(wide)) for _ in range(20)]
    s2 = Sampler(SamplingSpec(temperature=1.0, seed=7))
    c = [int(s2(wide)) for _ in range(20)]
    assert a == [b[0]] * 3 and b == c
    assert len(set(b)) > 1  # it does sample


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    s = Sampler(SamplingSpec(temperature=1.0, seed=0))
    draws = torch.stack([s(probs.log()) for _ in range(3000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / 3000
    assert torch.allclose(freq, probs[0], atol=0.03)


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0), dict(top_k=-1), dict(repetition_penalty=0)]
)
def test_bad_values_are_input_errors(kwargs):
    with pytest.raises(InputError):
        SamplingSpec(**kwargs)


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    generated = torch.tensor([[2, 2, 3]])  # token 2 twice, token 3 once
    out = apply_frequency_presence(logits, generated, frequency=0.5, presence=0.25)
    assert out.tolist() == [[1.0, 2.0, 3.0 - 2 * 0.5 - 0.25, 4.0 - 0.5 - 0.25]]
    assert torch.equal(apply_frequency_presence(logits, generated[:, :0], 0.5, 0.25), logits)
    spec = SamplingSpec(temperature=0.0, presence_penalty=2.0)
    assert spec.uses_history and not SamplingSpec().uses_history
    assert int(Sampler(spec)(torch.tensor([[0.0, 3.0, 2.0]]), generated=torch.tensor([[1]]))[0]) == 2
    with pytest.raises(InputError, match="frequency_penalty must be in"):
        SamplingSpec(frequency_penalty=2.5)


def test_top_k_fast_path_draws_from_the_reference_distribution():
    """Sampler filters the top k before top-p / min-p (no sort of the whole vocabulary): the distribution
    must be process_logits' own."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=g) * 3
    spec = SamplingSpec(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=1)
    context = torch.tensor([[int(logits.argmax()), 3, 4]])
    want = process_logits(logits, spec, context).softmax(-1)[0]
    sampler = Sampler(spec)
    counts = torch.zeros(500)
    for _ in range(4000):
        counts[int(sampler(logits, context)[0])] += 1
    assert set(counts.nonzero()[:, 0].tolist()) <= set(want.nonzero()[:, 0].tolist())
    assert (counts / 4000 - want).abs().max().item() < 0.03


def test_temperature_help_says_what_happens_when_it_is_not_given():
    """--help states the defaults it cannot import (that would load torch): the ones the code uses."""
    import re

    from llm_torch.core.checkpoint import EMBEDDED_MODELS
    from llm_torch.core.engine.sampling_spec import DEFAULT_SAMPLING
    from tests.cli_util import run_llm

    out = run_llm("generate", "--help", env={"COLUMNS": "200"}).stdout.decode()
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
    smol, d = EMBEDDED_MODELS["smollm2"].generation_config, DEFAULT_SAMPLING
    assert smol["do_sample"] and set(smol) == {"do_sample", "temperature", "top_k", "top_p"}
    assert (f"Default: the model's generation_config (greedy unless it samples; built-in smollm2: {smol['temperature']}, "
            f"top-k {smol['top_k']}, top-p {smol['top_p']}); without one {d['temperature']}, top-k {d['top_k']}, "
            f"top-p {d['top_p']}, min-p {d['min_p']}, repetition penalty {d['repetition_penalty']}.") in text
