"""Tokenizer: GGUF and tokenizer.json loading against HF transformers, chat templates, streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.tokenizer import IncrementalDetokenizer, Tokenizer

SAMPLES = [
    "Hello world",
    "  multiple   spaces\n\n\nnew lines\t\ttabs  ",
    "digits 1234567 3.14159 2024-01-01 and 99 bottles",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇯🇵",
    "CJK 你好世界 日本語のテキスト 한국어",
    "accents café naïve résumé Ñandú Ångström",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "don't I'll we've THEY'RE",
    "code: def f(x):\n    return x**2  # square",
    "",
]

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi! 👋"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?"},
    ],
]

TEXT_WITH_SPLIT_CHARACTERS = "Emoji 😀🎉👍🏽 and 你好世界, 日本語のテキスト, café 🇯🇵 done."


# ---- the real SmolLM2 GGUF against transformers' GGUF tokenizer ----------------------------------------


@pytest.fixture(scope="module")
def smollm(smollm2_gguf_path: Path) -> Tokenizer:
    return Tokenizer.load(smollm2_gguf_path)


@pytest.fixture(scope="module")
def smollm_reference(smollm2_gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name
    )


@pytest.mark.slow
@pytest.mark.parametrize("text", SAMPLES)
def test_gguf_encode_matches_transformers(smollm: Tokenizer, smollm_reference, text: str) -> None:
    assert smollm.encode(text) == smollm_reference.encode(text)
    assert smollm.decode(smollm.encode(text), skip_special_tokens=False) == text


@pytest.mark.slow
def test_gguf_special_tokens(smollm: Tokenizer, smollm_reference) -> None:
    assert smollm.vocab_size == len(smollm_reference)
    assert smollm.bos_token_id == smollm_reference.convert_tokens_to_ids("<|im_start|>")
    assert smollm.eos_token_id == smollm_reference.eos_token_id
    im_end, endoftext = smollm.token_to_id("<|im_end|>"), smollm.token_to_id("<|endoftext|>")
    assert {im_end, endoftext} <= smollm.eos_token_ids
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == smollm.bos_token_id and ids[-1] == im_end
    assert smollm.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.slow
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(
    smollm: Tokenizer, smollm_reference, conversation: list[dict], add_generation_prompt: bool
) -> None:
    expected = smollm_reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert smollm.has_chat_template
    assert smollm.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.slow
def test_gguf_offsets_and_token_text(smollm: Tokenizer) -> None:
    text = "a 😀 café"
    triples = smollm.encode_with_offsets(text)
    assert [t[0] for t in triples] == smollm.encode(text)
    # Each token's span covers the characters its bytes come from, in order, reaching the end of the text.
    assert all(0 <= start <= end <= len(text) for _, start, end in triples)
    assert triples[-1][2] == len(text)
    assert "".join(smollm.token_text(tid) for tid, _, _ in triples if "\ufffd" not in smollm.token_text(tid)) in text
    assert smollm.token_text(smollm.token_to_id("<|im_end|>")) == "<|im_end|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm.token_text(smollm.vocab_size)


@pytest.mark.slow
def test_incremental_detokenizer_on_gguf(smollm: Tokenizer) -> None:
    prompt = smollm.encode(smollm.apply_chat_template([{"role": "user", "content": "Say hi"}]))
    output = smollm.encode(TEXT_WITH_SPLIT_CHARACTERS)
    assert len(output) > len(TEXT_WITH_SPLIT_CHARACTERS.split())  # some characters span several tokens
    detok = IncrementalDetokenizer(smollm, prompt)
    deltas = [detok.add([tid]) for tid in output]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == detok.text == smollm.decode(output) == TEXT_WITH_SPLIT_CHARACTERS


@pytest.mark.slow
def test_incremental_detokenizer_special_tokens(smollm: Tokenizer) -> None:
    output = smollm.encode("Sure 👍<|im_end|>")
    kept = IncrementalDetokenizer(smollm, [], skip_special_tokens=False)
    skipped = IncrementalDetokenizer(smollm, [], skip_special_tokens=True)
    for tid in output:
        kept.add([tid])
        skipped.add([tid])
    assert kept.text == "Sure 👍<|im_end|>"
    assert skipped.text == "Sure 👍"


@pytest.mark.slow
def test_incremental_detokenizer_holds_cut_character_until_flush(smollm: Tokenizer) -> None:
    ids = smollm.encode("ok 😀")
    cut = ids[:-1]  # the emoji's last byte is missing
    detok = IncrementalDetokenizer(smollm, [])
    detok.add(cut)
    assert detok.text == "ok"
    assert detok.flush().startswith(" \ufffd")
    assert detok.text == smollm.decode(cut)


@pytest.mark.slow
def test_incremental_detokenizer_decodes_a_bounded_window(smollm: Tokenizer, monkeypatch) -> None:
    seen: list[int] = []
    original = Tokenizer.decode

    def spy(self, ids, skip_special_tokens=True):
        seen.append(len(ids))
        return original(self, ids, skip_special_tokens)

    output = smollm.encode(TEXT_WITH_SPLIT_CHARACTERS * 20)
    detok = IncrementalDetokenizer(smollm, list(range(100, 600)))
    monkeypatch.setattr(Tokenizer, "decode", spy)
    for tid in output:
        detok.add([tid])
    monkeypatch.undo()
    assert detok.text == smollm.decode(output)
    assert max(seen) <= 12  # a few tokens of context, never the whole prompt or output


# ---- a tiny tokenizer trained in the test, saved as an HF dir ---------------------------------------------

TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{{ raise_exception('tool messages are not supported') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def _train_tiny(tmp_path: Path) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "héllo wörld 你好", "numbers 123 456"] * 50
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_tiny(tmp_path), bos_token="<s>", eos_token="</s>"
    )
    wrapped.chat_template = TINY_TEMPLATE
    wrapped.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_from_dir_matches_transformers(tiny_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    tok = Tokenizer.load(tiny_dir)
    for text in ["the lazy fox", "héllo 你好 wörld!", "unseen words 789 </s>"]:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == reference.decode(reference.encode(text), skip_special_tokens=True)
    assert tok.bos_token_id == reference.bos_token_id
    assert tok.eos_token_id == reference.eos_token_id
    assert tok.eos_token_ids == {reference.eos_token_id, tok.token_to_id("<|im_end|>")}
    conversation = [{"role": "user", "content": 'say "hi" 😀'}, {"role": "assistant", "content": "hi"}]
    expected = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(conversation) == expected


def test_from_dir_reads_template_and_eos_from_config_files(tmp_path: Path) -> None:
    _train_tiny(tmp_path).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2], "bos_token_id": 0}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id == 0
    assert tok.eos_token_id == 1
    assert tok.eos_token_ids == {1, 2}
    assert tok.apply_chat_template([{"role": "user", "content": "plain"}]) == "plain"


def test_chat_template_errors(tiny_dir: Path) -> None:
    tok = Tokenizer.load(tiny_dir)
    bad_inputs = [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"content": "hi"}], "no 'role'"),
        ([{"role": "user"}], "no 'content'"),
        ([{"role": "user", "content": 5}], "must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text"),
        ([{"role": "tool", "content": "x"}], "tool messages are not supported"),
    ]
    for messages, message in bad_inputs:
        with pytest.raises(ValueError, match=message):
            tok.apply_chat_template(messages)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert '"a\\nb"' in tok.apply_chat_template(parts)


def test_missing_template_and_files(tmp_path: Path) -> None:
    _train_tiny(tmp_path).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="neither a GGUF"):
        Tokenizer.load(tmp_path / "weights.bin")


def test_incremental_detokenizer_on_tiny(tiny_dir: Path) -> None:
    tok = Tokenizer.load(tiny_dir)
    text = "héllo 你好 wörld, the fox 🦊!"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("the quick"))
    deltas = [detok.add([tid]) for tid in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
