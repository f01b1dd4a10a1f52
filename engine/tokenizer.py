"""Tokenizer: HF `tokenizers` built from tokenizer.json or a GGUF vocabulary, chat templates, streaming decode."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from engine.chat_template import ChatTemplate
from engine.sentencepiece_vocab import sentencepiece_bpe

# Tokens that end a turn in common chat formats; generation stops on them as on eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# Pre-tokenizer regexes that llama.cpp applies for each `tokenizer.ggml.pre` name, in order.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
# Llama 3 vocabularies take a whole pre-token from the vocab before trying merges.
_IGNORE_MERGES_PRE = {"llama-bpe", "llama3", "llama-v3"}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(
        self,
        backend: HFTokenizer,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_eos_ids: set[int] | None = None,
        chat_template: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self._tok = backend
        self.vocab_size = vocab_size or backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eos_token_ids = self._collect_eos_ids(eos_token_id, extra_eos_ids or set())
        self.chat_template = chat_template
        self._template = ChatTemplate(chat_template) if chat_template else None

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def load(cls, model_path: str | Path) -> Tokenizer:
        """Load from a GGUF file or an HF model directory (or its tokenizer.json)."""
        path = Path(model_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tokenizer source {str(path)!r} does not exist")
        if path.is_dir():
            return cls.from_dir(path)
        if path.name == "tokenizer.json":
            return cls.from_dir(path.parent)
        with path.open("rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        if is_gguf:
            return cls.from_gguf(path)
        raise ValueError(f"{str(path)!r} is neither a GGUF file nor a directory with tokenizer.json")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, with special tokens and chat template from the HF config files beside it."""
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {str(root)!r} (only fast-tokenizer dirs are supported)"
            )
        backend = HFTokenizer.from_file(str(root / "tokenizer.json"))
        # Older dirs keep special tokens in special_tokens_map.json; tokenizer_config.json wins where both say.
        tok_cfg = {
            **_read_json(root / "special_tokens_map.json"),
            **_read_json(root / "tokenizer_config.json"),
        }
        model_cfg = _read_json(root / "config.json")
        gen_cfg = _read_json(root / "generation_config.json")

        def token_id(name: str) -> int | None:
            content = tok_cfg.get(name)
            content = content.get("content") if isinstance(content, dict) else content
            return backend.token_to_id(content) if isinstance(content, str) else None

        gen_eos = _id_list(gen_cfg.get("eos_token_id")) + _id_list(model_cfg.get("eos_token_id"))
        bos = token_id("bos_token")
        if bos is None:
            bos = next(
                iter(_id_list(gen_cfg.get("bos_token_id")) + _id_list(model_cfg.get("bos_token_id"))), None
            )
        eos = token_id("eos_token")
        if eos is None:
            eos = next(iter(gen_eos), None)
        return cls(backend, bos, eos, set(gen_eos), _dir_chat_template(root, tok_cfg))

    _STATE_FILE = "kvserve_tokenizer.json"

    def save_state(self, directory: Path) -> None:
        """Write everything this tokenizer is made of, for from_state (the converted-model cache)."""
        (directory / "tokenizer.json").write_text(_with_merges_as_strings(self._tok.to_str()), encoding="utf-8")
        state = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                 "eos_token_ids": sorted(self.eos_token_ids), "chat_template": self.chat_template,
                 "vocab_size": self.vocab_size}
        (directory / self._STATE_FILE).write_text(json.dumps(state))

    @classmethod
    def from_state(cls, directory: Path) -> Tokenizer:
        """The exact tokenizer save_state wrote."""
        state = json.loads((directory / cls._STATE_FILE).read_text())
        backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        return cls(backend, state["bos_token_id"], state["eos_token_id"], set(state["eos_token_ids"]),
                   state["chat_template"], state["vocab_size"])

    @classmethod
    def from_gguf(cls, path_or_reader: Any) -> Tokenizer:
        """Build from GGUF metadata: llama.cpp's "gpt2" (byte-level BPE) or "llama" (SentencePiece) vocabularies;
        path or gguf.GGUFReader."""
        from gguf import GGUFReader

        from engine.gguf_loader import open_gguf

        reader = path_or_reader if isinstance(path_or_reader, GGUFReader) else open_gguf(path_or_reader)
        meta = {
            name: _field_value(field)
            for name, field in reader.fields.items()
            if name.startswith("tokenizer.")
        }
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r}: kvserve reads 'gpt2' (byte-level BPE) and 'llama' "
                "(SentencePiece) vocabularies; use the HF directory of this model instead"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        backend = _byte_level_bpe(tokens, meta) if kind == "gpt2" else sentencepiece_bpe(tokens, meta)

        def opt_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos, eos = opt_id("bos_token_id"), opt_id("eos_token_id")
        if kind == "gpt2" and meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)]
            )
        extra_eos = {i for i in (opt_id("eot_token_id"), opt_id("eom_token_id")) if i is not None}
        return cls(backend, bos, eos, extra_eos, meta.get("tokenizer.chat_template"), vocab_size=len(tokens))

    # ---- encode / decode ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) map to their ids."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """(id, start, end) per token, with character offsets into `text` (added bos gets (0, 0))."""
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return [(tid, start, end) for tid, (start, end) in zip(enc.ids, enc.offsets, strict=True)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 (a character cut between tokens) shows as U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Readable text of one token, special tokens included (for logprobs and inspection)."""
        if not 0 <= token_id < self.vocab_size or self._tok.id_to_token(token_id) is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token, which may be part of a UTF-8 character (for logprobs' `bytes`)."""
        text = self.token_text(token_id)
        raw = self._tok.id_to_token(token_id)
        if "\ufffd" not in text or raw is None:
            return text.encode()
        if _BYTE_FALLBACK.fullmatch(raw):  # SentencePiece byte-fallback token such as <0xE2>
            return bytes([int(raw[3:5], 16)])
        byte_of = _byte_level_alphabet()
        if all(ch in byte_of for ch in raw):
            return bytes(byte_of[ch] for ch in raw)
        return text.encode()

    def to_json(self) -> str:
        """The HF `tokenizers` definition (tokenizer.json text), for libraries that tokenize alongside us."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry spelled exactly as `token`, or None."""
        return self._tok.token_to_id(token)

    # ---- chat ---------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def template(self) -> ChatTemplate | None:
        """The compiled chat template (None when the model has none)."""
        return self._template

    def set_chat_template(self, source: str) -> None:
        """Replace the model's chat template (a server's --chat-template)."""
        self._template = ChatTemplate(source)
        self.chat_template = source

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            continue_final_message: bool = False, tools: list[dict] | None = None,
                            template_kwargs: dict[str, Any] | None = None) -> str:
        """Render a conversation with the model's chat template; ValueError on malformed messages."""
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain completion prompt instead")
        special = {
            "bos_token": self._special_text(self.bos_token_id),
            "eos_token": self._special_text(self.eos_token_id),
        }
        return self._template.render(messages, add_generation_prompt=add_generation_prompt,
                                     continue_final_message=continue_final_message, tools=tools,
                                     special_tokens=special, template_kwargs=template_kwargs)

    def _special_text(self, token_id: int | None) -> str:
        return (self._tok.id_to_token(token_id) or "") if token_id is not None else ""

    def _collect_eos_ids(self, eos: int | None, extra: set[int]) -> set[int]:
        ids = set(extra) | ({eos} if eos is not None else set())
        for name in END_OF_TURN_TOKENS:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                ids.add(token_id)
        return ids


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Decodes only a short window of recent tokens: `prefix` marks where the window starts (text already
    emitted before it), `read` where the unemitted part starts; the delta is decode(prefix:) - decode(prefix:read).
    """

    _PROMPT_CONTEXT = 5  # prompt tokens kept so the first output token decodes with its real left context

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids[-self._PROMPT_CONTEXT :])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the newly completed text ("" while a character is still incomplete)."""
        # One token at a time, so text before a cut character is not held back with it.
        return "".join(self._add_one(token_id) for token_id in new_token_ids)

    def _add_one(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        # A trailing U+FFFD means the last token ended inside a multi-byte character: wait for the rest.
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text) :]
        # Slide the window: the next step's prefix is what was just unemitted context.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (a cut character becomes U+FFFD); call when the sequence finishes."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        delta = full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


# ---- helpers ----------------------------------------------------------------------------------------


def _byte_level_bpe(tokens: list[str], meta: dict[str, Any]) -> HFTokenizer:
    """A byte-level BPE `tokenizers` object equivalent to llama.cpp's "gpt2" vocabulary."""
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    if pre_name not in GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre_name!r}; known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}"
        )
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a few files repeat filler tokens; the first id wins
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = HFTokenizer(
        models.BPE(vocab, merges, ignore_merges=pre_name in _IGNORE_MERGES_PRE, fuse_unk=False)
    )
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in GGUF_PRE_TOKENIZERS[pre_name]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    # Control tokens become special (skippable, matched whole in text); user-defined ones are matched whole.
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [t for t, kind in zip(tokens, types, strict=False) if kind == _CONTROL]
    user = [t for t, kind in zip(tokens, types, strict=False) if kind == _USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return backend


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves,
    the other bytes are shifted to code points 256 and up so no token contains whitespace or control chars."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in printable]
    alphabet = {chr(b): b for b in printable}
    alphabet.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return alphabet


def _field_value(field: Any) -> Any:
    """Python value of a GGUFReader field: str, number, bool, or list of those."""
    from gguf import GGUFValueType

    def one(part_index: int, value_type: GGUFValueType) -> Any:
        part = field.parts[part_index]
        if value_type == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part.tolist()[0]

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        if len(field.types) < 2:
            return []
        return [one(i, field.types[1]) for i in field.data]
    return one(field.data[0], field.types[0])


def _with_merges_as_strings(serialized: str) -> str:
    """A tokenizer's JSON with its BPE merges written "a b" rather than ["a", "b"], which `tokenizers` reads
    ~20 ms faster for SmolLM2's 48,900 merges (of a ~2 s cold start); kept as pairs where a part holds a space,
    which the string form cannot."""
    data = json.loads(serialized)
    model = data.get("model") or {}
    merges = model.get("merges")
    if merges and all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        model["merges"] = [f"{left} {right}" for left, right in merges]
    return json.dumps(data, ensure_ascii=False)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _dir_chat_template(root: Path, tok_cfg: dict[str, Any]) -> str | None:
    """The chat template of an HF dir: chat_template.jinja, else chat_template.json, else tokenizer_config."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return _pick_template(_read_json(root / "chat_template.json").get("chat_template")) or _pick_template(
        tok_cfg.get("chat_template")
    )


def _pick_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of named templates (take "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None
