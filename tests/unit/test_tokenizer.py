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
def test_saved_state_loads_the_same_tokenizer_with_merges_as_strings(smollm: Tokenizer, tmp_path: Path) -> None:
    smollm.save_state(tmp_path)
    merges = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert merges and all(isinstance(merge, str) for merge in merges)  # the form `tokenizers` reads faster
    loaded = Tokenizer.from_state(tmp_path)
    for text in [*SAMPLES, TEXT_WITH_SPLIT_CHARACTERS]:
        assert loaded.encode(text) == smollm.encode(text)
    assert (loaded.bos_token_id, loaded.eos_token_ids, loaded.vocab_size, loaded.chat_template) == (
        smollm.bos_token_id, smollm.eos_token_ids, smollm.vocab_size, smollm.chat_template)


def test_saved_state_keeps_merges_with_a_space_as_pairs(tmp_path: Path) -> None:
    vocab = {"a": 0, " ": 1, "b": 2, "a ": 3, "a b": 4}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[("a", " "), ("a ", "b")]))
    Tokenizer(backend, None, None, set(), None).save_state(tmp_path)
    merges = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert merges == [["a", " "], ["a ", "b"]]  # "a  b" could not say which space splits it
    assert Tokenizer.from_state(tmp_path).encode("a a b", add_special_tokens=False) == [3, 4]  # "a ", "a b"


@pytest.mark.slow
def test_gguf_offsets_and_token_text(smollm: Tokenizer) -> None:
    text = "a 😀 café"
    triples = smollm.encode_with_offsets(text)
    assert [t[0] for t in triples] == smollm.encode(text)
    # A token made of whole characters spans exactly its text; the pieces of the emoji all cover the emoji.
    for tid, start, end in triples:
        piece = smollm.token_text(tid)
        if "\ufffd" in piece:
            assert "😀" in text[start:end]
        else:
            assert text[start:end] == piece
    assert [start for _, start, _ in triples] == sorted(start for _, start, _ in triples)
    assert triples[-1][2] == len(text)
    assert b"".join(smollm.token_bytes(tid) for tid, _, _ in triples) == text.encode()
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
        assert tok.decode(tok.encode(text)) == reference.decode(
            reference.encode(text), skip_special_tokens=True
        )
    assert tok.bos_token_id == reference.bos_token_id
    assert tok.eos_token_id == reference.eos_token_id
    assert tok.eos_token_ids == {reference.eos_token_id, tok.token_to_id("<|im_end|>")}
    conversation = [{"role": "user", "content": 'say "hi" 😀'}, {"role": "assistant", "content": "hi"}]
    expected = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(conversation) == expected


def test_from_dir_reads_template_and_eos_from_config_files(tmp_path: Path) -> None:
    _train_tiny(tmp_path).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages[0]['content'] }}"})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2], "bos_token_id": 0}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id == 0
    assert tok.eos_token_id == 1
    assert tok.eos_token_ids == {1, 2}
    assert tok.apply_chat_template([{"role": "user", "content": "plain"}]) == "plain"
    # A chat_template.jinja file takes precedence, as in transformers.
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }} {{ eos_token }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "1 </s>"


def test_from_dir_reads_special_tokens_map(tmp_path: Path) -> None:
    _train_tiny(tmp_path).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>") == 2
    assert tok.bos_token_id is None


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
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(empty)
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
    assert b"".join(tok.token_bytes(tid) for tid in ids) == text.encode()


# ---- small GGUF vocabularies written in the test ------------------------------------------------------------

SPECIALS = ("<s>", "</s>", "<|im_end|>")


def _write_gguf(path: Path, tokenizer_model: str, pre: str, add_bos: bool = True) -> Path:
    gguf = pytest.importorskip("gguf")
    trained = json.loads(_train_tiny(path.parent).to_str())
    tokens = [t for t, _ in sorted(trained["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in trained["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_SAMPLES = ["numbers 1234567 and 456", "héllo\n\n  wörld's THEY'RE 你好</s>", "the  lazy\tdog\r\n!!"]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_small_gguf_matches_transformers(tmp_path: Path, pre: str) -> None:
    transformers = pytest.importorskip("transformers")
    path = _write_gguf(tmp_path / "tiny.gguf", "gpt2", pre)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tok = Tokenizer.load(path)
    for text in GGUF_SAMPLES:
        assert tok.encode(text) == reference.encode(text)
        assert tok.encode(text)[0] == tok.bos_token_id == 0  # add_bos_token
        assert tok.decode(tok.encode(text)) == text.replace("</s>", "")
    assert tok.eos_token_ids == {1, tok.token_to_id("<|im_end|>")}
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi</s>"


def test_small_gguf_smollm_splits_digits(tmp_path: Path) -> None:
    def digit_tokens(pre: str) -> list[str]:
        tok = Tokenizer.load(_write_gguf(tmp_path / f"{pre}.gguf", "gpt2", pre, add_bos=False))
        return [tok.token_text(i) for i in tok.encode("1234567")]

    assert any(len(piece) > 1 for piece in digit_tokens("gpt2"))  # the vocab does merge digits...
    assert digit_tokens("smollm") == list("1234567")  # ...but llama.cpp's smollm pre-tokenizer splits them


def test_unsupported_gguf_tokenizers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 't5'.*'gpt2'.*'llama' \\(SentencePiece\\)"):
        Tokenizer.load(_write_gguf(tmp_path / "t5.gguf", "t5", "default"))
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'made-up'"):
        Tokenizer.load(_write_gguf(tmp_path / "odd.gguf", "gpt2", "made-up"))
