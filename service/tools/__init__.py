"""Tool calling: parsers of the models' tool-call formats (one file each), the forced formats of
tool_choice required/named, and how a chat request's tools shape its prompt, decoding and answer."""

from __future__ import annotations

from service.tools.hermes import HermesToolParser
from service.tools.llama3_json import Llama3JsonToolParser
from service.tools.mistral import MistralToolParser
from service.tools.parser import ToolParser

PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}
DEFAULT_PARSER = "hermes"


def detect_parser(template: str | None) -> type[ToolParser]:
    """The tool-call format a chat template teaches its model (Hermes when it shows none)."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return MistralToolParser
    if "<tool_call>" in text:
        return HermesToolParser
    if "<|python_tag|>" in text or ('"parameters"' in text and "ipython" in text):
        return Llama3JsonToolParser
    return PARSERS[DEFAULT_PARSER]


def tool_text_format(template: str | None, parser_name: str | None) -> type[ToolParser]:
    """The format of tool calls in model text: --tool-call-parser if set, else the template's."""
    return PARSERS[parser_name] if parser_name else detect_parser(template)


__all__ = ["DEFAULT_PARSER", "PARSERS", "ToolParser", "detect_parser", "tool_text_format"]
