"""The command line: one precedence for every value, clear errors, --help everywhere."""

import dataclasses
import json
import re
import subprocess
import sys
import typing

import pytest

from app.cli import COMMANDS, _converter, build_config, env_name, load_command, main, parse
from app.log import log_config
from app.errors import ConfigError
from app.phases import sft


def test_precedence_flag_over_env_over_preset_over_default():
    env = {"PIPELINE_SFT_EPOCHS": "5", "PIPELINE_LORA_R": "4"}
    config = build_config(sft.Config, ["--lora-r", "8", "--preset", "abel-7b"], environ=env)
    assert config.lora_r == 8  # flag beats env
    assert config.sft_epochs == 5.0  # env beats preset (abel-7b says 3)
    assert config.base_model == "GAIR/Abel-7B-002"  # preset beats default
    assert config.lora_dropout == 0.05  # default


def test_env_selects_the_preset():
    config = build_config(sft.Config, [], environ={"PIPELINE_PRESET": "abel-7b"})
    assert config.bf16 is True and config.train_data == "hf:openai/gsm8k"


def test_booleans_and_lists_from_env_and_flags():
    _, config = parse(["rollouts", "--variants", "direct,reflective", "--no-bf16"], environ={})
    assert config.variants == ["direct", "reflective"] and config.bf16 is False
    _, config = parse(["eval"], environ={"PIPELINE_PLATINUM": "yes", "PIPELINE_MODELS": "sft,dpo"})
    assert config.platinum is True and config.models == ["sft", "dpo"]


def test_shard_index_defaults_to_job_completion_index(monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    _, config = parse(["rollouts", "--num-shards", "4"], environ={})
    assert config.shard_index == 3


@pytest.mark.parametrize("argv,message", [
    (["sft", "--sft-epochs", "0"], "--sft-epochs"),
    (["sft", "--run-id", "bad/id"], "--run-id"),
    (["sft", "--run-id", "abc\n"], "--run-id"),
    (["sft", "--run-id", "abc."], "--run-id"),
    (["sft", "--run-id", "a" * 64], "--run-id"),
    (["sft", "--preset", "huge"], "unknown preset"),
    (["rollouts", "--variants", "direct,sideways"], "unknown"),
    (["rollouts", "--num-shards", "2", "--shard-index", "2"], "--shard-index"),
    (["preferences", "--quality-threshold", "-1"], "--quality-threshold"),
    (["dpo", "--dpo-beta", "0"], "--dpo-beta"),
    (["eval", "--models", "base,gpt"], "--models"),
    (["pipeline", "--from", "dpo", "--to", "sft"], "after"),
    (["nonsense"], "unknown command"),
])
def test_bad_values_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv, environ={})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="PIPELINE_SFT_EPOCHS"):
        parse(["sft"], environ={"PIPELINE_SFT_EPOCHS": "many"})


def test_exit_codes(capsys):
    assert main(["sft", "--sft-epochs", "0"]) == 2
    assert "error: --sft-epochs" in capsys.readouterr().err
    assert main(["--help"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["sft", "--no-such-flag"])
    assert exc.value.code == 2


def test_pipeline_accepts_every_phase_flag_and_hands_them_on():
    _, config = parse(["pipeline", "--lora-r", "4", "--quality-threshold", "0.3", "--from", "rollouts"], environ={})
    phases = config.phase_configs()
    assert phases["sft"].lora_r == 4
    assert phases["preferences"].quality_threshold == 0.3
    assert config.phases() == ["rollouts", "preferences", "dpo", "eval"]


HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "vllm", "accelerate")


@pytest.mark.parametrize("command", [c for c in COMMANDS])
def test_every_command_has_help_without_loading_the_heavy_libraries(command):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "app", command, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PIPELINE_" in result.stdout
    assert command == "bench" or "--store" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY)


def test_the_cli_leaves_the_process_group_it_ran_in(tmp_path):
    """Under torchrun an open gloo/NCCL group can abort the process at exit, after the work is done."""
    import torch.distributed as dist

    from app.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["bench", "pretrain"]) == 2  # any command, failing or not
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


HELP_CASES = [
    ([], {}),
    (["--preset", "abel-7b"], {}),
    ([], {"PIPELINE_PRESET": "abel-7b"}),
    (["--seed", "3", "--dpo-recipe", "reference"], {"PIPELINE_PRESET": "abel-7b", "PIPELINE_FORCE": "true",
                                                    "PIPELINE_MAX_NEW_TOKENS": "128"}),
]


def shown_values(text: str) -> dict[str, tuple[str, str]]:
    """{env variable: (value, source)} from --help's "[value: V (SOURCE); env PIPELINE_X]" notes."""
    flat = " ".join(text.split())
    found = re.findall(r"\[value: (\S*) \(([^)]*)\); env (PIPELINE_[A-Z0-9_]+)\]", flat)
    assert len(found) == len({env for _, _, env in found})
    return {env: (value, source) for value, source, env in found}


def flags_of(argv: list[str], names: set[str]) -> list[str]:
    """The `--flag value` pairs of `argv` that a command with these fields has."""
    pairs = zip(argv[::2], argv[1::2])
    return [arg for flag, value in pairs if flag[2:].replace("-", "_") in names for arg in (flag, value)]


def typed(text: str, tp):
    """A value shown by --help, read back the way the flag would read it."""
    if text == "none" and typing.get_origin(tp) is not list:  # a list shows its items: --report-to none
        return None
    return _converter(tp)[0]("" if text == '""' else text)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("argv,environ", HELP_CASES)
def test_help_shows_what_the_run_uses(command, argv, environ, capsys):
    """Each flag's value in --help equals the config this command line builds, and the config
    the phase logs at its start; presets, recipes and PIPELINE_* variables included."""
    module = load_command(command)
    names = {f.name for f in dataclasses.fields(module.Config) if f.init}
    argv = flags_of(argv, names)
    with pytest.raises(SystemExit) as exc:
        parse([command, *argv, "--help"], environ=environ)
    assert exc.value.code == 0
    shown = shown_values(capsys.readouterr().out)
    _, config = parse([command, *argv], environ=environ)
    log_config(config)
    logged = json.loads(capsys.readouterr().out.split("config: ", 1)[1])
    hints = typing.get_type_hints(module.Config)
    assert set(shown) == {env_name(name) for name in names}
    for name in names:
        value, source = shown[env_name(name)]
        assert typed(value, hints[name]) == getattr(config, name) == logged[name], name
        given = "--" + name.replace("_", "-") in argv
        expected = "flag" if given else "env" if env_name(name) in environ else None
        assert expected is None or source == expected, name
        assert source in ("flag", "env", "default") or re.fullmatch(r"(preset|recipe) [\w-]+", source), source


def test_help_names_the_preset_and_recipe_a_value_comes_from(capsys):
    with pytest.raises(SystemExit):
        parse(["dpo", "--preset", "abel-7b", "--help"], environ={})
    shown = shown_values(capsys.readouterr().out)
    assert shown["PIPELINE_BASE_MODEL"] == ("GAIR/Abel-7B-002", "preset abel-7b")
    assert shown["PIPELINE_DPO_SFT_WEIGHT"] == ("1.0", "recipe rpo")
    assert shown["PIPELINE_CHECK_STEP0"] == ("true", "default")
    with pytest.raises(SystemExit):
        parse(["sft", "--help"], environ={})
    shown = shown_values(capsys.readouterr().out)  # the bare run: the tiny preset, not the dataclass defaults
    assert shown["PIPELINE_SFT_EPOCHS"] == ("3", "preset tiny")
    assert shown["PIPELINE_SFT_LEARNING_RATE"] == ("0.002", "preset tiny")
    assert shown["PIPELINE_MAX_SEQ_LENGTH"] == ("256", "preset tiny")
