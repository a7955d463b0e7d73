"""Presets and DPO recipes as the CLI resolves them: flag > environment > recipe > preset > default."""

import pytest

from app.cli import parse
from app.errors import ConfigError


@pytest.mark.parametrize("argv,expected", [
    # abel-7b follows the evidence: DPO + NLL weight 1 on the chosen answer, at the guide's lr/batch/beta
    (["--preset", "abel-7b"], {"dpo_recipe": "rpo", "dpo_sft_weight": 1.0, "dpo_learning_rate": 5e-6,
                               "dpo_batch_size": 2, "dpo_grad_accum": 2, "dpo_beta": 0.1}),
    # the reference guide's plain DPO is one flag away
    (["--preset", "abel-7b", "--dpo-recipe", "reference"], {"dpo_recipe": "reference", "dpo_sft_weight": 0.0,
                                                            "dpo_learning_rate": 5e-6, "dpo_batch_size": 2,
                                                            "dpo_grad_accum": 2, "dpo_beta": 0.1}),
    # a flag beats the recipe; TRL's old name for the NLL weight is accepted
    (["--preset", "abel-7b", "--dpo-recipe", "reference", "--dpo-learning-rate", "1e-6"],
     {"dpo_sft_weight": 0.0, "dpo_learning_rate": 1e-6}),
    (["--preset", "abel-7b", "--dpo-rpo-alpha", "0.5"], {"dpo_recipe": "rpo", "dpo_sft_weight": 0.5}),
    # the demo preset has no recipe: its DPO is what the README table measured
    ([], {"dpo_recipe": "", "dpo_sft_weight": 0.0, "dpo_learning_rate": 2e-5, "dpo_beta": 0.5}),
    (["--dpo-recipe", "rpo"], {"dpo_sft_weight": 1.0, "dpo_learning_rate": 2e-5}),
])
def test_dpo_recipe_resolution(argv, expected):
    _, config = parse(["dpo", *argv], environ={})
    assert {k: getattr(config, k) for k in expected} == expected


def test_environment_beats_the_recipe():
    _, config = parse(["dpo", "--preset", "abel-7b"], environ={"PIPELINE_DPO_SFT_WEIGHT": "0.25"})
    assert config.dpo_sft_weight == 0.25


def test_unknown_recipe_is_a_config_error():
    with pytest.raises(ConfigError, match="--dpo-recipe 'ipo'"):
        parse(["dpo", "--dpo-recipe", "ipo"], environ={})


def test_pipeline_hands_the_recipe_to_dpo():
    _, config = parse(["pipeline", "--preset", "abel-7b", "--dpo-recipe", "reference"], environ={})
    assert config.phase_configs()["dpo"].dpo_sft_weight == 0.0


def test_small_preset_is_the_proving_ground():
    _, config = parse(["pipeline", "--preset", "small"], environ={})
    phases = config.phase_configs()
    assert phases["sft"].base_model == "small" and phases["sft"].train_data == "synthetic-hard:20000"
    assert phases["eval"].eval_data == "synthetic-hard-test:1000"  # >= 1,000 held-out questions
    assert phases["dpo"].dpo_recipe == "rpo" and phases["dpo"].dpo_sft_weight == 1.0
    # the reference case's plain DPO on the same SFT adapter and pairs is one flag away
    _, plain = parse(["dpo", "--preset", "small", "--dpo-recipe", "reference"], environ={})
    assert plain.dpo_sft_weight == 0.0 and plain.dpo_learning_rate == 5e-6 and plain.dpo_batch_size == 2
