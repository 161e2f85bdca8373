"""SamplingParams: vLLM defaults, normalisation, validation messages, fan-out, engine-side verify."""

from __future__ import annotations

import msgspec
import pytest

from tidellm.sample.params import MAX_LOGPROBS, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.logit_bias is None and p.seed is None and p.logprobs is None and p.prompt_logprobs is None
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos
    assert (p.min_tokens, p.max_tokens) == (0, 16)
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not p.include_stop_str_in_output and not p.greedy and not p.uses_penalties


def test_normalisation():
    p = SamplingParams(top_k=-1, stop="END", logit_bias={"7": 5})
    assert p.top_k == 0 and p.stop == ["END"] and p.logit_bias == {7: 5.0}
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_greedy_resets_truncation():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert p.greedy and (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-4).greedy


@pytest.mark.parametrize(
    ("kwargs", "name", "got"),
    [
        ({"n": 0}, "n", "0"),
        ({"temperature": -1.0}, "temperature", "-1.0"),
        ({"temperature": float("nan")}, "temperature", "nan"),
        ({"top_p": 0.0}, "top_p", "0.0"),
        ({"top_p": 1.5}, "top_p", "1.5"),
        ({"top_k": -2}, "top_k", "-2"),
        ({"min_p": 1.5}, "min_p", "1.5"),
        ({"min_p": -0.1}, "min_p", "-0.1"),
        ({"presence_penalty": 2.5}, "presence_penalty", "2.5"),
        ({"frequency_penalty": -3.0}, "frequency_penalty", "-3.0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "0.0"),
        ({"max_tokens": 0}, "max_tokens", "0"),
        ({"min_tokens": -1}, "min_tokens", "-1"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens", "10"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs", str(MAX_LOGPROBS + 1)),
        ({"logprobs": -1}, "logprobs", "-1"),
        ({"prompt_logprobs": 21}, "prompt_logprobs", "21"),
        ({"logit_bias": {5: 101.0}}, "logit_bias", "101.0"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias", "-1"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias", "'x'"),
        ({"stop": ["ok", ""]}, "stop", "''"),
        ({"stop_token_ids": [1, -5]}, "stop_token_ids", "-5"),
        ({"seed": 1.5}, "seed", "1.5"),
    ],
)
def test_invalid_values_name_param_value_and_range(kwargs, name, got):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert msg.startswith(name) and f"(got {got})" in msg and "must be" in msg


def test_error_message_format():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0 \(got -1\.0\)$"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)


def test_boundaries_accepted():
    SamplingParams(
        top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2, logprobs=0, prompt_logprobs=20
    )
    SamplingParams(logit_bias={0: -100, 1: 100}, top_k=1, n=5)
    SamplingParams(min_tokens=16, max_tokens=16)
    SamplingParams(min_tokens=100, max_tokens=None)


def test_clone_is_deep():
    p = SamplingParams(stop=["a"], logit_bias={1: 2.0})
    c = p.clone()
    c.stop.append("b")
    c.logit_bias[3] = 1.0
    assert (
        p.stop == ["a"]
        and p.logit_bias == {1: 2.0}
        and c == SamplingParams(stop=["a", "b"], logit_bias={1: 2, 3: 1})
    )


def test_child_params_fan_out():
    kids = SamplingParams(n=3, seed=10, temperature=0.8).child_params()
    assert [k.n for k in kids] == [1, 1, 1] and [k.seed for k in kids] == [10, 11, 12]
    assert all(k.temperature == 0.8 for k in kids)
    assert [k.seed for k in SamplingParams(n=2).child_params()] == [None, None]
    assert SamplingParams(n=4, seed=1).child(2).seed == 3


def test_verify_against_engine():
    p = SamplingParams(logprobs=5, prompt_logprobs=3, logit_bias={99: 1.0}, stop_token_ids=[98])
    p.verify(vocab_size=100, max_logprobs=5)
    with pytest.raises(ValueError, match=r"^logprobs must be <= 4"):
        p.verify(vocab_size=100, max_logprobs=4)
    with pytest.raises(ValueError, match=r"^prompt_logprobs must be <= 2"):
        SamplingParams(prompt_logprobs=3).verify(vocab_size=100, max_logprobs=2)
    with pytest.raises(ValueError, match=r"^logit_bias token id .*\(got 99\)"):
        p.verify(vocab_size=99, max_logprobs=20)
    with pytest.raises(ValueError, match=r"^stop_token_ids .*\(got 98\)"):
        SamplingParams(stop_token_ids=[98]).verify(vocab_size=98, max_logprobs=20)
    with pytest.raises(ValueError, match=r"^logprobs must be <= 3"):
        SamplingParams(logprobs=4).verify(vocab_size=3, max_logprobs=20)


def test_from_optional_treats_none_as_default():
    p = SamplingParams.from_optional(temperature=None, top_p=0.9, n=None, max_tokens=None, stop=None)
    assert (p.temperature, p.top_p, p.n, p.max_tokens, p.stop) == (1.0, 0.9, 1, None, [])
    with pytest.raises(TypeError, match="best_of"):
        SamplingParams.from_optional(best_of=2)


def test_msgspec_round_trip():
    p = SamplingParams(temperature=0.3, stop="x", logit_bias={5: -2.0}, seed=4, logprobs=2, top_k=-1)
    q = msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams)
    assert q == p and q.logit_bias == {5: -2.0}
    with pytest.raises(ValueError, match="top_p"):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"top_p": 0.0}), type=SamplingParams)
