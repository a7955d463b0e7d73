"""The command line: `python -m app <command> [--flags]`.

Every command is a module with a dataclass `Config` and a `main(config)`. This file
turns the dataclass into argparse flags (dash-case, `help=` from the field metadata)
and resolves each value with one precedence, highest first:

    --flag  >  PIPELINE_<FIELD> environment variable  >  --dpo-recipe  >  --preset  >  dataclass default

so a Kubernetes ConfigMap can set `PIPELINE_*` variables and a user can still
override one of them on the command line. `--help` shows each flag's value as this
command line and environment resolve it, and where it comes from (`... --preset abel-7b
--help` shows abel-7b's values). Bad values exit with code 2 before anything heavy is
imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import os
import sys
import textwrap
import typing
from typing import Any

from app.config import unwrap_optional as _unwrap_optional
from app.errors import EXIT_CONFIG, EXIT_RETRYABLE, ConfigError, PipelineError
from app.log import warn
from app.presets import preset_layers

ENV_PREFIX = "PIPELINE_"

COMMANDS: dict[str, str] = {
    "sft": "app.phases.sft",
    "rollouts": "app.phases.rollouts",
    "preferences": "app.phases.preferences",
    "dpo": "app.phases.dpo",
    "eval": "app.phases.eval",
    "pipeline": "app.phases.pipeline",
    "merge": "app.phases.merge",
    "lineage": "app.phases.lineage",
    "report": "app.phases.report",
    "rehearse": "app.rehearse",
    "bench": "app.bench",
}


# Variables whose meaning changed: refused, so an old ConfigMap cannot silently mean something else.
RETIRED_ENV = {"PIPELINE_N_SAMPLES": ("samples_per_question", "set PIPELINE_SAMPLES_PER_QUESTION (trajectories per "
                                      "question), or PIPELINE_ROLLOUT_LIMIT (the number of questions, as --n-samples)")}


def dashed(arg: str) -> str:
    """`--foo_bar[=v]` -> `--foo-bar[=v]`: every flag also takes the underscore spelling (TRL's, the
    reference guide's). Values are left alone."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _converter(tp: Any):
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return str, list(choices)
    if tp in (int, float, str):
        return tp, None
    if tp is bool:
        return _parse_bool, None
    if typing.get_origin(tp) in (list, tuple):
        (inner, *_) = typing.get_args(tp)
        return (lambda text: [_converter(inner)[0](part) for part in _split_list(text)]), None
    raise TypeError(f"unsupported config field type {tp!r}")


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _field_types(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def show(value: Any) -> str:
    """A value as it would be typed after its flag (lists comma-separated, booleans true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value) or '""'
    if value is None:
        return "none"
    return str(value) if value != "" else '""'


HELP_EPILOG = """\
Each flag's [value: ...] is what a run with the flags given here and this environment uses,
and where it comes from, highest first: a flag, a PIPELINE_<FIELD> variable (env), then,
for commands with --preset, the DPO recipe and the preset; else the field's default."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps help lines only at spaces: a value such as hf:openai/gsm8k or an s3:// URI stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


def build_parser(config_cls: type, prog: str, description: str | None = None,
                 shown: tuple[Any, dict[str, str]] | None = None, add_help: bool = True) -> argparse.ArgumentParser:
    """Flags for every field of `config_cls`; `shown` = (config, {field: source}) puts the value
    each flag resolves to, and its source (flag, env, recipe R, preset P, default), into its
    --help line."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=HELP_EPILOG if shown else None,
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS,
        add_help=add_help,
    )
    hints = _field_types(config_cls)
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        flags = ["--" + field.name.replace("_", "-"), *field.metadata.get("aliases", ())]
        tp = _unwrap_optional(hints[field.name])
        help_text = field.metadata.get("help", "")
        if shown:
            config, sources = shown
            help_text += (f" [value: {show(getattr(config, field.name))} ({sources[field.name]}); "
                          f"env {env_name(field.name)}]")
        help_text = help_text.replace("%", "%%")
        if tp is bool:
            parser.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        convert, choices = _converter(tp)
        parser.add_argument(*flags, dest=field.name, type=convert, choices=choices, help=help_text,
                            metavar=field.name.upper())
    return parser


def resolve(config_cls: type, given: dict[str, Any], environ) -> tuple[dict[str, Any], dict[str, str]]:
    """({field: value}, {field: source}) from the flags given, the environment, the preset and
    its DPO recipe; fields none of them set are left to the dataclass (source "default")."""
    hints = _field_types(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls) if f.init]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {name: "default" for name in names}
    for name in names:
        raw = environ.get(env_name(name))
        if raw is None:
            continue
        convert, choices = _converter(hints[name])
        try:
            value = convert(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{env_name(name)}={raw!r}: {exc}") from None
        if choices and value not in choices:
            raise ConfigError(f"{env_name(name)}={raw!r}: choose from {choices}")
        values[name], sources[name] = value, "env"
    for name, value in given.items():
        if name in sources:
            values[name], sources[name] = value, "flag"

    preset_name = values.get("preset")
    if preset_name is None and "preset" in names:
        preset_name = next(f.default for f in dataclasses.fields(config_cls) if f.name == "preset")
    if preset_name is not None:
        layered: dict[str, tuple[Any, str]] = {}
        for source, layer in preset_layers(preset_name, values.get("dpo_recipe")):
            layered.update({name: (value, source) for name, value in layer.items()})
        for name, (value, source) in layered.items():
            if name in sources and name not in values:
                values[name], sources[name] = value, source
    return values, sources


def build_config(config_cls: type, argv: list[str], prog: str = "app", environ: dict[str, str] | None = None,
                 description: str | None = None):
    """Parse `argv` plus the environment into a `config_cls` instance and validate it.

    The flags are read twice: first without --help, to resolve every value; then with it,
    so that --help shows the values this very command line would run with."""
    environ = os.environ if environ is None else environ
    for name, instead in RETIRED_ENV.items():
        if name in environ and instead[0] in {f.name for f in dataclasses.fields(config_cls)}:
            raise ConfigError(f"{name} is no longer read: {instead[1]}")
    argv = [dashed(arg) for arg in argv]
    given, _ = build_parser(config_cls, prog, add_help=False).parse_known_args(argv)
    values, sources = resolve(config_cls, vars(given), environ)
    config = config_cls(**values)
    build_parser(config_cls, prog, description, shown=(config, sources)).parse_args(argv)  # --help, unknown flags
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def load_command(command: str):
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[command])


def parse(argv: list[str], environ: dict[str, str] | None = None):
    """`parse(["sft", "--epochs", "2"])` -> ("sft", sft.Config(...)). Used by tests and by k8s checks."""
    if not argv:
        raise ConfigError("no command given\n" + usage())
    command, rest = argv[0], argv[1:]
    module = load_command(command)
    positional = getattr(module, "POSITIONAL", None)  # `bench sft` == `bench --phase sft`
    if positional and rest and not rest[0].startswith("-"):
        rest = ["--" + positional.replace("_", "-"), rest[0], *rest[1:]]
    return command, build_config(module.Config, rest, prog=f"python -m app {command}", environ=environ,
                                 description=module.__doc__)


def usage() -> str:
    lines = ["usage: python -m app <command> [--flags]   (python -m app <command> --help for its flags)", "",
             "commands:"]
    for name, module_name in COMMANDS.items():
        summary = (importlib.import_module(module_name).__doc__ or module_name).strip().split("\n\n")[0]
        lines.append(f"  {name:12s} {' '.join(summary.split())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if _under_accelerate_launch():
        if int(os.environ.get("RANK", "0")) == 0:
            warn(f"error: accelerate launch reports every failure as exit 1, so a Job would retry bad config and "
                 f"bad data as if they were crashes; run the same processes with the exit codes kept: python -m "
                 f"app.launch --nproc-per-node {os.environ.get('WORLD_SIZE', '1')} {' '.join(argv)}")
        return EXIT_CONFIG
    try:
        return _run(argv)
    finally:
        _leave_process_group()


def _under_accelerate_launch() -> bool:
    """`accelerate launch -m app ...`: its launcher turns any non-zero exit of ours into 1 (and a
    traceback), which Kubernetes retries. app/launch.py, which keeps the codes, sets the code file."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ and "PIPELINE_EXIT_CODE_FILE" not in os.environ


def _run(argv: list[str]) -> int:
    try:
        command, config = parse(argv)
        load_command(command).main(config)
        return 0
    except PipelineError as exc:
        warn(f"error: {exc}")
        _record_exit_code(exc.exit_code)
        return exc.exit_code
    except SystemExit as exc:
        if exc.code == EXIT_CONFIG:  # argparse's exit on a bad flag: a usage error like ConfigError
            _record_exit_code(EXIT_CONFIG)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_RETRYABLE
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _crashed()
        # Nothing was published (a manifest is written last); a new pod may have room: retry.
        warn(f"error: disk full: {exc}")
        return EXIT_RETRYABLE
    except Exception:  # noqa: BLE001 - a crash: its traceback, as Python prints it, but redacted
        return _crashed()


def _crashed() -> int:
    """A bug or an unexpected failure: the traceback (credentials in URIs redacted), exit 1 (retried)."""
    import traceback

    warn(traceback.format_exc().rstrip())
    return EXIT_RETRYABLE


def _leave_process_group() -> None:
    """Under torchrun, leave the process group before the interpreter exits.

    Left open, gloo's (and NCCL's) background threads can outlive the interpreter's teardown and
    abort the process ("terminate called without an active exception", SIGABRT) after the work
    is done: torchrun then reports a failure for a phase that succeeded. Best effort: never raises.
    """
    dist = sys.modules.get("torch.distributed")  # not imported: no group to leave (and --help stays light)
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the command's own exit code matters more
        pass


def _record_exit_code(code: int) -> None:
    """Append `code` to $PIPELINE_EXIT_CODE_FILE: torchrun exits 1 whatever its workers exit
    with, so app/launch.py reads the workers' codes from there. Best effort: never raises."""
    path = os.environ.get("PIPELINE_EXIT_CODE_FILE")
    if not path:
        return
    try:
        with open(path, "a") as handle:  # one short write per worker: O_APPEND keeps lines whole
            handle.write(f"{code}\n")
    except Exception:  # noqa: BLE001 - the exit code itself matters more than this copy of it
        pass
