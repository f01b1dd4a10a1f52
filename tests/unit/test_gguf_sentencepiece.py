"""GGUF SentencePiece vocabularies ("llama": Llama 2, Mistral, Gemma) against SentencePiece itself and the HF
tokenizer of the same model.

The reference model is trained here with the `sentencepiece` package (BPE with byte fallback, a user-defined
symbol), turned into a HF LlamaTokenizer by transformers, and written into a GGUF the way llama.cpp's
convert_hf_to_gguf writes SentencePiece vocabularies (pieces, scores, token types, special ids, add_bos).
"""

from __future__ import annotations

import io
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm

from engine.sentencepiece_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Héllo wörld, ça va? Señor niño, Ångström, naïve café, Œuvre, Straße.",
    "日本語のテキストです。東京は大きい都市です。你好，世界！한국어 문장입니다.",
    "Привет, как дела? Всё хорошо. Ελληνικά γράμματα. مرحبا بالعالم. שלום עולם.",
    "def foo(x):\n    return x * 2  # comment\n\tindented\r\nwindows line",
    "Numbers 1234567890 and 3.14159, dates 2026-12-04, math ∑ ∫ √ ≈ ≠ ∞.",
]
# Unicode-heavy, with characters the tiny vocabulary lacks (byte fallback) and runs of whitespace.
SAMPLES = [
    "Hello world",
    "The quick brown fox — «jumps» over the lazy dog…",
    "Héllo wörld, ça va? Señor niño! ÅNGSTRÖM",
    "日本語のテキスト、東京。你好世界 한국어 테스트",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇯🇵 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Привет мир, Ελληνικά, مرحبا, שלום, हिन्दी, ไทย",
    "code:\n    return x**2  # square\n\n\ttab\r\nend",
    "multiple   spaces    inside   and trailing   ",
    "digits 0123456789 ∑∫√ ≈≠∞ ½ ¾ ™ © ®",
    "zero\u200bwidth and combining e\u0301 a\u0308",
]
LEADING_SPACE = ["  two leading spaces", " one", "\n newline first", "\tx"]
USER_SYMBOL = "<tool>"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=out, vocab_size=700, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=[USER_SYMBOL], split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


@pytest.fixture(scope="module")
def processor(spm_model: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(spm_model))


def add_vocabulary(writer: gguf.GGUFWriter, sp: spm.SentencePieceProcessor, add_bos: bool = True,
                   add_space_prefix: bool = True) -> None:
    """The vocabulary keys as convert_hf_to_gguf's _set_vocab_sentencepiece writes them."""
    tokens, scores, types = [], [], []
    for token_id in range(sp.vocab_size()):
        piece = sp.id_to_piece(token_id)
        tokens.append(piece)
        scores.append(sp.get_score(token_id))
        if sp.is_unknown(token_id):
            types.append(UNKNOWN)
        elif sp.is_control(token_id):
            types.append(CONTROL)
        elif sp.is_byte(token_id):
            types.append(BYTE)
        else:
            types.append(USER_DEFINED if piece == USER_SYMBOL else NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(add_space_prefix)


def write_vocab_gguf(sp: spm.SentencePieceProcessor, path: Path, **options: bool) -> Path:
    """A GGUF holding only the vocabulary."""
    writer = gguf.GGUFWriter(str(path), "llama")
    add_vocabulary(writer, sp, **options)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def kvserve_tok(processor: spm.SentencePieceProcessor, tmp_path_factory) -> Tokenizer:
    return Tokenizer.load(write_vocab_gguf(processor, tmp_path_factory.mktemp("gguf") / "vocab.gguf"))


@pytest.fixture(scope="module")
def hf_tok(spm_model: Path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model with it
    return transformers.LlamaTokenizer.from_pretrained(str(spm_model.parent), legacy=True)


def test_the_samples_need_byte_fallback_and_merges(processor: spm.SentencePieceProcessor) -> None:
    pieces = [p for text in SAMPLES for p in processor.encode(text, out_type=str)]
    assert any(p.startswith("<0x") for p in pieces)  # characters outside the vocabulary
    assert any(len(p) > 3 and not p.startswith("<0x") for p in pieces)  # merged pieces


@pytest.mark.parametrize("text", SAMPLES + LEADING_SPACE)
def test_ids_equal_sentencepiece(kvserve_tok: Tokenizer, processor: spm.SentencePieceProcessor, text: str) -> None:
    assert kvserve_tok.encode(text) == [processor.bos_id(), *processor.encode(text)]
    assert kvserve_tok.encode(text, add_special_tokens=False) == processor.encode(text)


@pytest.mark.parametrize("text", SAMPLES + [f"call {USER_SYMBOL}now", f"a {USER_SYMBOL}b</s>"])
def test_ids_equal_the_hf_tokenizer(kvserve_tok: Tokenizer, hf_tok, text: str) -> None:
    # (HF's Metaspace pre-tokenizer adds no "▁" before text that already starts with whitespace, where
    # SentencePiece and llama.cpp do, so LEADING_SPACE is checked against SentencePiece only.)
    assert kvserve_tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)
    ids = kvserve_tok.encode(text)
    assert kvserve_tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_text_after_a_special_token_is_prefixed_as_llama_cpp_does(kvserve_tok: Tokenizer,
                                                                  processor: spm.SentencePieceProcessor) -> None:
    # llama.cpp tokenizes each run of text between special tokens on its own, each with the dummy prefix.
    tool = kvserve_tok.token_to_id(USER_SYMBOL)
    expected = [*processor.encode("call "), tool, *processor.encode(" now"), 2]
    assert kvserve_tok.encode(f"call {USER_SYMBOL} now</s>", add_special_tokens=False) == expected


@pytest.mark.parametrize("text", SAMPLES + LEADING_SPACE)
def test_round_trip(kvserve_tok: Tokenizer, processor: spm.SentencePieceProcessor, text: str) -> None:
    ids = kvserve_tok.encode(text)
    assert kvserve_tok.decode(ids) == text == processor.decode(ids)
    # Streaming decode gives the same text, byte-fallback pieces of one character held until complete.
    detok = IncrementalDetokenizer(kvserve_tok, ids[:1])
    streamed = "".join(detok.add([token_id]) for token_id in ids[1:]) + detok.flush()
    assert streamed == text


def test_special_tokens_and_metadata(kvserve_tok: Tokenizer, processor: spm.SentencePieceProcessor,
                                     tmp_path: Path) -> None:
    assert (kvserve_tok.bos_token_id, kvserve_tok.eos_token_id) == (1, 2)
    assert 2 in kvserve_tok.eos_token_ids
    with_specials = kvserve_tok.encode("<s>hi</s>", add_special_tokens=False)
    assert with_specials[0] == 1 and with_specials[-1] == 2  # control tokens written in the text
    assert kvserve_tok.decode(kvserve_tok.encode("hi</s>")) == "hi"  # control tokens are skipped
    emoji = processor.encode("😀", out_type=str)
    assert [kvserve_tok.token_bytes(kvserve_tok.token_to_id(p)) for p in emoji[1:]] == [bytes([b]) for b in
                                                                                       "😀".encode()]
    no_bos = Tokenizer.load(write_vocab_gguf(processor, tmp_path / "no_bos.gguf", add_bos=False))
    assert no_bos.encode("Hello") == processor.encode("Hello")
    # Gemma's vocabularies say add_space_prefix = false: no dummy "▁" in front of the text.
    gemma_like = Tokenizer.load(write_vocab_gguf(processor, tmp_path / "gemma.gguf", add_space_prefix=False))
    pieces = [gemma_like.token_text(i) for i in gemma_like.encode("Hello world", add_special_tokens=False)]
    assert "".join(pieces) == "Hello world"
    assert kvserve_tok.encode("Hello world", add_special_tokens=False)[0] != gemma_like.encode(
        "Hello world", add_special_tokens=False)[0]  # "▁Hello..." with the prefix, "Hello..." without
    assert gemma_like.decode(gemma_like.encode(" Hello")) == " Hello"


def test_mismatched_scores_are_refused(processor: spm.SentencePieceProcessor, tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "a", "b"])
    writer.add_token_scores([0.0, -1.0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="3 tokens but 2 scores"):
        Tokenizer.load(tmp_path / "bad.gguf")


def test_a_llama2_style_gguf_generates_like_transformers(processor: spm.SentencePieceProcessor, tmp_path: Path) -> None:
    """A whole model with a SentencePiece vocabulary: text in, the same greedy tokens as transformers, text out."""
    import torch
    from helpers.tiny_models import LLAMA_DIMS, randomize, write_gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine import LLM, SamplingParams

    config = LlamaConfig(**{**LLAMA_DIMS, "vocab_size": processor.vocab_size()}, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = randomize(LlamaForCausalLM(config))
    path = write_gguf(hf, tmp_path / "llama2-style.gguf", vocabulary=lambda w: add_vocabulary(w, processor))
    llm = LLM(path, device="cpu", dtype="float32", quantization="none", cache_converted=False,
              kv_cache_bytes=1 << 20)
    prompt = "Héllo wörld 😀, 日本語"
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ids = [1, *processor.encode(prompt)]
    assert out.prompt_token_ids == ids
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(ids):]
    assert out.outputs[0].token_ids == expected.tolist()
    # (Random weights emit stray byte tokens, which decoders render differently; the streamed text equals
    # one decode of the ids.)
    assert out.outputs[0].text == llm.tokenizer.decode(expected.tolist())
    assert llm.tokenizer.decode(ids) == prompt
