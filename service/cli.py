"""`kvserve serve | generate | pull | cpu-features`. The serve flags are generated from Settings, so they cannot drift."""

from __future__ import annotations

import argparse
import gc
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError

from service.settings import Quantization, Settings, unset_meaning

# Settings fields whose flag is not simply --field-name.
_FLAG_NAMES = {"api_keys": "--api-key"}


def _is_list(annotation: object) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_list(typing.get_args(annotation)[0])
    return origin is list


def shown_default(name: str) -> str:
    """A setting's default as --help shows it: the value Settings uses, or what leaving it unset means."""
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    meaning = unset_meaning(name)
    if default in (None, []) and meaning is not None:
        return meaning
    return str(default) if isinstance(default, str) else repr(default)


def settings_help(name: str, with_env: bool = True) -> str:
    """The help text of setting `name`'s flag: description, env var and default, all read from Settings."""
    description = Settings.model_fields[name].description or ""
    env = f"env KVSERVE_{name.upper()}; " if with_env else ""
    return f"{description} [{env}default: {shown_default(name)}]"


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; values stay strings and pydantic converts and checks them."""
    for name, field in Settings.model_fields.items():
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        help_text = settings_help(name).replace("%", "%%")  # argparse formats help with %
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif _is_list(field.annotation):
            parser.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS,
                                help=help_text + " (repeatable)")
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags given, over KVSERVE_* env vars, over defaults."""
    given = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    from service.loading import start_loading
    from service.logging_setup import configure_logging

    # Start-up creates hundreds of thousands of objects (torch's modules, FastAPI's, the model) and frees few:
    # the cyclic collector's passes over them took 0.25 s of a 2 s cold start. It is off until the engine is
    # built, then on again with start-up's objects frozen, out of every later pass (the ~7k among them that
    # are already cyclic garbage, ~1 MB, stay: collecting them first would cost the start 0.1 s).
    gc.disable()
    settings = settings_from_args(args)
    configure_logging(settings.log_format, settings.log_level)
    loading = start_loading(settings)  # before the web stack's imports, which then overlap the model's load
    loading.add_done_callback(lambda _: (gc.freeze(), gc.enable()))
    from service.server import run_server

    run_server(settings, loading)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    # One prompt: one sequence, so the KV cache is sized for one full-length sequence, not a server's worth.
    llm = LLM(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization, progress=True,
              max_num_seqs=1)
    prompt: str | list[int] = args.prompt
    if args.chat:
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from engine import models_registry

    print(models_registry.pull(args.name))
    return 0


def _cpu_features(_: argparse.Namespace) -> int:
    from engine import native
    from engine.cpu_features import report

    print(report())
    reason = native.unavailable_reason()  # builds the kernel where it is not cached yet (about a second)
    print("decode attention (--attention-backend auto): "
          + ("kvserve's paged kernel" if reason is None else f"gather + SDPA; the paged kernel is unavailable: {reason}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The kvserve command line."""
    parser = argparse.ArgumentParser(prog="kvserve", description="A small LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_settings_flags(serve)
    serve.set_defaults(run=_serve)

    generate = commands.add_parser("generate", help="stream a completion to the terminal")
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="apply the model's chat template")
    generate.add_argument("--max-tokens", type=int, default=128, help="tokens to generate [default: %(default)s]")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy [default: %(default)s]")
    generate.add_argument("--seed", type=int, default=None, help="sampling seed [default: none]")
    # The engine flags it shares with serve take their defaults and help from Settings too.
    for name in ("model", "device", "dtype", "quantization"):
        generate.add_argument("--" + name, default=Settings.model_fields[name].default,
                              help=settings_help(name, with_env=False).replace("%", "%%"),
                              choices=typing.get_args(Quantization) if name == "quantization" else None)
    generate.set_defaults(run=_generate)

    pull = commands.add_parser("pull", help="download a registry model and print its path")
    pull.add_argument("name", help="registry name, e.g. smollm2-135m")
    pull.set_defaults(run=_pull)

    features = commands.add_parser("cpu-features", help="print the CPU features detected, the default CPU "
                                   "weight format they select, the formats refused here and the decode attention")
    features.set_defaults(run=_cpu_features)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kvserve` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            print(f"kvserve: invalid setting {where}: {error['msg']}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvserve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
