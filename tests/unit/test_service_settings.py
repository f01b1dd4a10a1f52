"""Settings: every field is a `kvserve serve` flag and a KVSERVE_* env var; flags win over env."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.speculative import NgramConfig
from service.cli import build_parser, settings_from_args
from service.settings import Settings, unset_meaning


def parse(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_every_setting_is_a_flag() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001 - argparse has no API
    dests = {action.dest for action in serve._actions}
    assert set(Settings.model_fields) <= dests


def test_defaults_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"KVSERVE_{name.upper()}", raising=False)
    defaults = parse()
    assert (defaults.model, defaults.host, defaults.port, defaults.model_name) == \
        ("smollm2-135m", "127.0.0.1", 8000, "smollm2-135m")
    monkeypatch.setenv("KVSERVE_PORT", "9001")
    monkeypatch.setenv("KVSERVE_MAX_NUM_SEQS", "4")
    monkeypatch.setenv("KVSERVE_API_KEYS", "a, b")
    monkeypatch.setenv("KVSERVE_LOG_REQUESTS_TEXT", "true")
    from_env = parse()
    assert (from_env.port, from_env.max_num_seqs, from_env.api_keys, from_env.log_requests_text) == \
        (9001, 4, ["a", "b"], True)
    flags = parse("--port", "9002", "--api-key", "c", "--api-key", "d", "--no-log-requests-text",
                  "--served-model-name", "m", "--quantization", "int8")
    assert (flags.port, flags.api_keys, flags.log_requests_text, flags.model_name) == (9002, ["c", "d"], False, "m")
    assert flags.engine_config_kwargs() == {"device": "auto", "dtype": "auto", "quantization": "int8", "max_num_seqs": 4,
                                            "max_num_batched_tokens": 1024, "batch_invariant": False, "attention_backend": "auto",
                                            "speculative": NgramConfig()}


def test_api_key_file_adds_keys(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nk1\n\nk2\n")
    assert parse("--api-key", "k0", "--api-key-file", str(key_file)).api_keys == ["k0", "k1", "k2"]


@pytest.mark.parametrize("argv", [["--port", "http"], ["--port", "70000"], ["--log-format", "xml"],
                                  ["--max-num-seqs", "0"], ["--quantization", "int3"], ["--api-key-file", "/nonexistent/keys"],
                                  ["--speculative-config", '{"method": "eagle"}'], ["--speculative-config", "ngram"]])
def test_invalid_settings_are_rejected(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        parse(*argv)


def test_speculative_config_takes_vllms_json(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse().engine_config_kwargs()["speculative"] == NgramConfig()  # on by default
    assert parse("--speculative-config", "off").engine_config_kwargs()["speculative"] is None
    flags = parse("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert flags.engine_config_kwargs()["speculative"] == NgramConfig(num_speculative_tokens=3, prompt_lookup_max=5)
    monkeypatch.setenv("KVSERVE_SPECULATIVE_CONFIG", '{"prompt_lookup_min": 1}')
    assert parse().engine_config_kwargs()["speculative"] == NgramConfig(prompt_lookup_min=1)


def test_quantization_choices_match_the_engine() -> None:
    import typing

    from engine.models.cpu_matmul import QUANTIZATIONS
    from service.settings import Quantization

    assert typing.get_args(Quantization) == QUANTIZATIONS


def _subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]  # noqa: SLF001 - argparse has no API


def _shown_defaults(command: str) -> dict[str, str]:
    """{dest: the default its --help text shows}, read from the formatted help as a user sees it."""
    parser = _subparser(command)
    text = " ".join(parser.format_help().split("options:", 1)[1].split())  # the flag list, not the usage line
    shown = {}
    for action in parser._actions:  # noqa: SLF001
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        match = re.search(re.escape(flag) + r"\b.*?\[(?:env \S+; )?default: (.*?)\]", text)
        assert match, f"{flag}'s help shows no default"
        shown[action.dest] = match.group(1)
    return shown


def test_serve_help_shows_the_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"KVSERVE_{name.upper()}", raising=False)
    real = parse()  # what serve runs with when no flag and no env var is given
    shown = _shown_defaults("serve")
    for name in Settings.model_fields:
        value = getattr(real, name)
        if value in (None, []):
            # "None" would tell a user nothing: the help says what unset means
            assert unset_meaning(name) and shown[name] == unset_meaning(name), name
        else:
            assert shown[name] == (value if isinstance(value, str) else repr(value)), name


def test_generate_shares_the_serve_defaults() -> None:
    args = build_parser().parse_args(["generate", "hi"])
    shown = _shown_defaults("generate")
    for name in ("model", "device", "dtype", "quantization"):
        assert getattr(args, name) == Settings.model_fields[name].default == shown[name]
    assert (args.max_tokens, shown["max_tokens"]) == (128, "128")


def test_settings_defaults_are_the_engines() -> None:
    """Settings that spell out an engine default (so --help can show it) must hold the engine's value."""
    from engine.config import EngineConfig

    engine_defaults = EngineConfig()
    for name, value in Settings.model_construct().engine_config_kwargs().items():
        assert value == getattr(engine_defaults, name), name


def test_request_body_timeout_defaults_to_30_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVSERVE_REQUEST_BODY_TIMEOUT", raising=False)
    assert parse().request_body_timeout == 30.0
    monkeypatch.setenv("KVSERVE_REQUEST_BODY_TIMEOUT", "5")
    assert parse().request_body_timeout == 5.0
    assert parse("--request-body-timeout", "2.5").request_body_timeout == 2.5
    with pytest.raises(ValueError):
        parse("--request-body-timeout", "0")
