"""IncrementalDetokenizer: streamed deltas must add up to what a full ``decode`` gives, for both decoder
families (GPT-2 byte-level BPE and SentencePiece byte fallback), and stop strings must cut the text exactly.
"""

from __future__ import annotations

import json
import random
import time

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from tidellm.engine.detokenizer import IncrementalDetokenizer
from tidellm.tokenizer.tokenizer import Tokenizer

FFFD = "\ufffd"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! Streaming keeps the leading space of each word.",
    "café naïve résumé — stop here END of text",
]
CHAR_POOL = (
    list("abc xyz.,!?\n") + list("éüñç—“”") + list("你好世界日本語한국어") + ["😀", "🎉", "👍🏽", "🇫🇷", "✓"]
)


# ---------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def smol(smollm2_tokenizer) -> Tokenizer:
    """SmolLM2's byte-level BPE (vocab 49152), built from the default model's GGUF (fetched once per session)."""
    assert isinstance(smollm2_tokenizer, Tokenizer)
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    """A small Llama-style SentencePiece BPE: Metaspace words, <0xNN> byte fallback, <s>/</s> specials."""
    trainer_tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer_tok.train_from_iterator(SENTENCES * 20, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):  # byte tokens are ordinary vocabulary entries, as in Llama
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    backend = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return Tokenizer(backend, bos_token_id=1, eos_token_id=2)


@pytest.fixture(params=["smol", "spm"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------- helpers
def stream(
    tokenizer: Tokenizer,
    prompt: list[int],
    ids: list[int],
    *,
    chunk: int = 1,
    finish: bool = True,
    **kwargs: object,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed ``ids`` ``chunk`` at a time the way the output processor does; return deltas and the stop hit."""
    detok = IncrementalDetokenizer(tokenizer, prompt, **kwargs)
    deltas: list[str] = []
    stop = None
    for k in range(0, len(ids), chunk):
        stop = detok.update(ids[k : k + chunk], stop_terminated=False)
        done = stop is not None or (finish and k + chunk >= len(ids))
        deltas.append(detok.get_next_output_text(done, delta=True))
        if stop is not None:
            break
    return detok, deltas, stop


def reference(tokenizer: Tokenizer, prompt: list[int], ids: list[int], skip: bool = True) -> str:
    """What the output adds to the prompt's text in a full decode."""
    full = tokenizer.decode(prompt + ids, skip_special_tokens=skip)
    head = tokenizer.decode(prompt, skip_special_tokens=skip)
    assert full.startswith(head)
    return full[len(head) :]


def first_stop(text: str, stops: list[str], include: bool) -> tuple[str, str] | None:
    """Reference rule: the stop string whose first occurrence ends first (ties: starts first)."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not found:
        return None
    end, start, s = min(found)
    return s, text[: end if include else start]


def token_pieces(tokenizer: Tokenizer, prompt: list[int], ids: list[int]) -> list[str]:
    """The text each token adds (in context)."""
    return [
        reference(tokenizer, prompt, ids[: i + 1])[len(reference(tokenizer, prompt, ids[:i])) :]
        for i in range(len(ids))
    ]


# ---------------------------------------------------------------- multi-byte characters
@pytest.mark.parametrize("text", ["Hi 😀 there", "你好，世界！日本語", "naïve café 👍🏽 🇫🇷 ok", "🎉🎉🎉"])
def test_multibyte_split_across_tokens(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert any(FFFD in tok.decode([i]) for i in ids), "test text should split a character across tokens"
    detok, deltas, _ = stream(tok, [], ids)
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) == detok.output_text == text


def test_byte_level_char_emitted_with_completing_token(smol: Tokenizer) -> None:
    ids = smol.encode("a😀b", add_special_tokens=False)
    detok = IncrementalDetokenizer(smol, [])
    emitted = []
    for i in ids:
        detok.update([i], stop_terminated=False)
        emitted.append(detok.get_next_output_text(False, delta=True))
    # Every token adds text as soon as the decode of the ids so far has no incomplete tail.
    for k, delta in enumerate(emitted):
        so_far = smol.decode(ids[: k + 1])
        if not so_far.endswith(FFFD):
            assert "".join(emitted[: k + 1]) == so_far
        else:
            assert delta == ""
    assert "".join(emitted) == "a😀b"


def test_byte_fallback_invalid_run_matches_decode(spm: Tokenizer) -> None:
    """ByteFallback turns a whole invalid byte run into U+FFFDs, even a valid 'é' inside it: we must not have
    streamed that 'é' early."""
    byte = {b: spm.token_to_id(f"<0x{b:02X}>") for b in (0xC3, 0xA9, 0xE2)}
    the = spm.token_to_id("▁the")
    ids = [the, byte[0xC3], byte[0xA9], byte[0xE2], the]
    detok, deltas, _ = stream(spm, [], ids)
    assert "".join(deltas) == detok.output_text == spm.decode(ids) == "the��� the"
    assert not any("é" in d for d in deltas)
    # Valid run: emitted when the run is closed by a normal token.
    detok, deltas, _ = stream(spm, [], [the, byte[0xC3], byte[0xA9], the])
    assert deltas == ["the", "", "", "é the"]


def test_incomplete_tail_flushed_at_finish(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀", add_special_tokens=False)[:-1]  # length limit hit inside the emoji
    detok, deltas, _ = stream(tok, [], ids, finish=False)
    assert FFFD not in "".join(deltas)
    tail = detok.get_next_output_text(finished=True, delta=True)
    assert "".join(deltas) + tail == detok.output_text == tok.decode(ids)
    assert detok.output_text.endswith(FFFD)


def test_prompt_ending_inside_a_character(smol: Tokenizer) -> None:
    ids = smol.encode("x 😀 ok", add_special_tokens=False)
    cut = next(k for k in range(1, len(ids)) if smol.decode(ids[:k]).endswith(FFFD))
    detok, deltas, _ = stream(smol, ids[:cut], ids[cut:])
    assert "".join(deltas) == detok.output_text == smol.decode(ids[cut:])


# ---------------------------------------------------------------- fuzz
def _random_case(tokenizer: Tokenizer, rng: random.Random) -> tuple[list[int], list[int]]:
    prompt = tokenizer.encode(rng.choice(SENTENCES), add_special_tokens=False) if rng.random() < 0.7 else []
    if rng.random() < 0.5:  # arbitrary ids: invalid byte sequences, specials anywhere
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
    else:  # real multilingual text with special tokens spliced in
        text = "".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text, add_special_tokens=False)
    specials = sorted(tokenizer.all_special_ids)
    for _ in range(rng.randint(0, 3)):
        ids.insert(rng.randint(0, len(ids)), rng.choice(specials))
    return prompt, ids


def test_fuzz_deltas_concatenate_to_full_decode(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(200):
        prompt, ids = _random_case(tok, rng)
        skip = rng.random() < 0.5
        chunk = rng.choice([1, 1, 1, 2, 3])
        detok, deltas, stop = stream(tok, prompt, ids, chunk=chunk, skip_special_tokens=skip)
        expected = reference(tok, prompt, ids, skip)
        assert stop is None
        assert "".join(deltas) == detok.output_text == expected, (prompt, ids, skip, chunk)
        assert detok.output_token_ids == ids
        if not prompt:
            assert expected == tok.decode(ids, skip_special_tokens=skip)
        # No U+FFFD is streamed that the full decode does not have.
        assert "".join(deltas).count(FFFD) == expected.count(FFFD)


def test_fuzz_stop_strings(tok: Tokenizer) -> None:
    rng = random.Random(99)
    for _ in range(200):
        text = " ".join(rng.choice(SENTENCES + ["".join(rng.choices(CHAR_POOL, k=12))]) for _ in range(2))
        ids = tok.encode(text, add_special_tokens=False)
        full = reference(tok, [], ids)
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(full))
            stops.append(full[start : start + rng.randint(1, 6)])
        if rng.random() < 0.3:
            stops.append("NOT-IN-TEXT")
        include = rng.random() < 0.5
        chunk = rng.choice([1, 2, 3])
        detok, deltas, stop = stream(
            tok, [], ids, chunk=chunk, stop=stops, include_stop_str_in_output=include
        )
        expected_stop, expected_text = first_stop(full, stops, include)
        assert (stop, detok.output_text) == (expected_stop, expected_text), (text, stops, include, chunk)
        assert "".join(deltas) == expected_text
        # Ids stop at the token that completed the stop string.
        k = len(detok.output_token_ids)
        assert detok.output_token_ids == ids[:k]
        assert first_stop(reference(tok, [], ids[: k - 1]), stops, include) is None


# ---------------------------------------------------------------- stop strings
def test_stop_string_spanning_two_tokens(tok: Tokenizer) -> None:
    text = "Hello world, this is the end of the quick brown fox."
    ids = tok.encode(text, add_special_tokens=False)
    pieces = token_pieces(tok, [], ids)
    k = next(
        k for k in range(1, len(ids)) if len(pieces[k - 1]) >= 3 and len(pieces[k].strip()) >= 3 and k > 3
    )
    stop = pieces[k - 1][-2:] + pieces[k][:2]
    assert text.index(stop) == len("".join(pieces[:k])) - 2
    detok = IncrementalDetokenizer(tok, [], stop=[stop])
    expected = "".join(pieces[:k])[:-2]
    streamed = ""
    for token_id in ids:
        hit = detok.update([token_id], stop_terminated=False)
        streamed += detok.get_next_output_text(hit is not None, delta=True)
        assert expected.startswith(streamed)  # the stop's first half was held back, never streamed
        if hit is not None:
            break
    assert (hit, detok.output_token_ids) == (stop, ids[: k + 1])  # completed by token k
    assert streamed == detok.output_text == expected


def test_stop_inside_one_token_drops_trailing_text(tok: Tokenizer) -> None:
    prompt = tok.encode("Say:", add_special_tokens=False)
    ids = tok.encode(" quick brown", add_special_tokens=False)
    pieces = token_pieces(tok, prompt, ids)
    assert pieces[0] == " quick"
    for include, expected in ((False, " q"), (True, " qui")):
        detok, deltas, stop = stream(tok, prompt, ids, stop=["ui"], include_stop_str_in_output=include)
        assert stop == "ui"
        assert "".join(deltas) == detok.output_text == expected
        assert detok.output_token_ids == ids[:1]


def test_earliest_stop_wins(tok: Tokenizer) -> None:
    ids = tok.encode("the lazy dog jumps over the fox", add_special_tokens=False)
    stops = ["fox", "jumps", "dog"]  # "dog" occurs first, although listed last
    for chunk in (1, len(ids)):  # token by token, and all in one update (both matches in one text)
        detok, deltas, stop = stream(tok, [], ids, chunk=chunk, stop=stops)
        assert (stop, detok.output_text, "".join(deltas)) == ("dog", "the lazy ", "the lazy ")
    # Overlapping matches in one update: the one that completes first wins (tokenization-independent).
    detok, _, stop = stream(tok, [], ids, chunk=len(ids), stop=["lazy dog", "azy"])
    assert (stop, detok.output_text) == ("azy", "the l")


def test_stop_hold_back_and_release(tok: Tokenizer) -> None:
    """A prefix of a stop string is held back while streaming, and released if the stop never completes."""
    ids = tok.encode("one <EN two <END> three", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["<END>"])
    streamed = ""
    for token_id in ids:
        hit = detok.update([token_id], stop_terminated=False)
        streamed += detok.get_next_output_text(hit is not None, delta=True)
        assert "one <EN two ".startswith(streamed)  # no part of "<END>" is ever streamed
        if hit is not None:
            break
    assert (hit, streamed, detok.output_text) == ("<END>", "one <EN two ", "one <EN two ")

    ids = tok.encode("almost <EN", add_special_tokens=False)
    detok, deltas, stop = stream(tok, [], ids, finish=False, stop=["<END>"])
    assert stop is None and "".join(deltas) == "almost"  # " <EN" (4 chars) held back
    assert detok.get_next_output_text(False, delta=False) == "almost"
    assert "".join(deltas) + detok.get_next_output_text(True, delta=True) == "almost <EN"
    assert detok.get_next_output_text(True, delta=False) == "almost <EN"


def test_include_stop_str_streams_without_hold_back(tok: Tokenizer) -> None:
    ids = tok.encode("a b STOP c d", add_special_tokens=False)
    detok, deltas, stop = stream(tok, [], ids, stop=["STOP"], include_stop_str_in_output=True)
    assert (stop, "".join(deltas), detok.output_text) == ("STOP", "a b STOP", "a b STOP")


def test_stop_in_prompt_or_across_prompt_boundary_never_matches(tok: Tokenizer) -> None:
    prompt = tok.encode("Say STOP and then wor", add_special_tokens=False)
    ids = tok.encode("ld peace", add_special_tokens=False)
    detok, deltas, stop = stream(tok, prompt, ids, stop=["STOP", "world"])
    assert stop is None
    assert "".join(deltas) == detok.output_text == reference(tok, prompt, ids)


def test_stop_terminated_by_eos(smol: Tokenizer) -> None:
    ids = smol.encode("Hi there", add_special_tokens=False)
    cases = [(True, False, "Hi there"), (False, False, "Hi there"), (False, True, "Hi there<|im_end|>")]
    for skip, include, expected in cases:
        detok = IncrementalDetokenizer(smol, [], skip_special_tokens=skip, include_stop_str_in_output=include)
        assert detok.update(ids[:1], stop_terminated=False) is None
        assert detok.update([*ids[1:], 2], stop_terminated=True) is None
        assert detok.get_next_output_text(True, delta=False) == detok.output_text == expected
        assert detok.output_token_ids == [*ids, 2]
        assert detok.update([5], stop_terminated=False) is None and detok.output_token_ids == [*ids, 2]


# ---------------------------------------------------------------- special tokens and context
def test_special_tokens_skipped_or_kept(smol: Tokenizer) -> None:
    hi, there = smol.encode("Hi", add_special_tokens=False), smol.encode(" there", add_special_tokens=False)
    ids = [1, *hi, 2, 2, *there]
    detok, deltas, _ = stream(smol, [], ids)
    assert "".join(deltas) == "Hi there"
    detok, deltas, _ = stream(smol, [], ids, skip_special_tokens=False)
    assert "".join(deltas) == "<|im_start|>Hi<|im_end|><|im_end|> there" == smol.decode(ids, False)


def test_spaces_between_special_tokens() -> None:
    """Only decoders that join tokens with spaces (WordPiece) differ; False glues adjacent added tokens."""
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    backend = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens(["[CLS]", "[SEP]"])
    wp = Tokenizer(backend)
    ids = [1, 2, 3, 4, 5, 2, 1]
    _, deltas, _ = stream(wp, [], ids, skip_special_tokens=False)
    assert (
        "".join(deltas) == wp.decode(ids, skip_special_tokens=False) == "[CLS] [SEP] hello worlds [SEP] [CLS]"
    )
    _, deltas, _ = stream(wp, [], ids, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert "".join(deltas) == "[CLS][SEP] hello worlds [SEP][CLS]"
    _, deltas, _ = stream(wp, [], ids, spaces_between_special_tokens=False)
    assert "".join(deltas) == wp.decode(ids) == "hello worlds"


def test_first_token_leading_space_after_prompt(smol: Tokenizer, spm: Tokenizer) -> None:
    world = spm.encode("world", add_special_tokens=False)
    assert spm.convert_ids_to_tokens(world)[0].startswith("▁")
    # SentencePiece: decode(output) alone strips the first "▁"; after a prompt the space belongs to the text.
    assert spm.decode(world) == "world"
    hello = spm.encode("Hello", add_special_tokens=False)
    cases = [(hello, True, " world"), ([1], True, "world"), ([], True, "world"), ([1], False, " world")]
    for prompt, skip, expected in cases:
        detok, deltas, _ = stream(spm, prompt, world, skip_special_tokens=skip)
        assert "".join(deltas) == detok.output_text == expected == reference(spm, prompt, world, skip)
    # Prompts ending in skipped specials still give context from the visible prompt tokens before them.
    detok, _, _ = stream(spm, [*hello, 2, 2, 2, 2, 2, 2, 1], world)
    assert detok.output_text == " world"
    # Byte-level BPE carries the space inside the token ("Ġworld").
    detok, deltas, _ = stream(smol, smol.encode("Hello"), smol.encode(" world"))
    assert "".join(deltas) == " world"


def test_non_delta_output_and_multi_token_updates(tok: Tokenizer) -> None:
    ids = tok.encode("Streaming 你好 text, with stop ### here", add_special_tokens=False)
    one = stream(tok, [], ids, stop=["###"])[0].output_text
    many = stream(tok, [], ids, chunk=4, stop=["###"])[0].output_text
    assert one == many == "Streaming 你好 text, with stop "
    detok = IncrementalDetokenizer(tok, [], stop=["###"])
    seen = ""
    for token_id in ids:
        hit = detok.update([token_id], stop_terminated=False)
        text = detok.get_next_output_text(hit is not None, delta=False)
        assert text.startswith(seen)
        seen = text
        if hit is not None:
            break
    assert seen == one


def test_rejects_empty_stop_string(smol: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(smol, [], stop=["x", ""])


# ---------------------------------------------------------------- cost
def test_2000_tokens_stream_fast(tok: Tokenizer) -> None:
    para = "The engine streams text 😀 to many users, 你好世界, café au lait. "
    ids = (tok.encode(para * 200, add_special_tokens=False) * 2)[:2000]
    assert len(ids) == 2000
    prompt = tok.encode("Tell me a story.", add_special_tokens=False)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        detok = IncrementalDetokenizer(tok, prompt, stop=["<END>", "###"])
        for token_id in ids:
            detok.update([token_id], stop_terminated=False)
            detok.get_next_output_text(False, delta=True)
        detok.get_next_output_text(True, delta=True)
        best = min(best, time.perf_counter() - start)
    assert detok.output_text == reference(tok, prompt, ids)
    assert best < 0.1, f"2000 tokens took {best * 1000:.1f} ms"
