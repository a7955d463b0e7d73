"""The HF backend's static-cache mode generates what the default mode generates.

On the CPU transformers does not compile, so this checks the shapes the GPU path relies on:
prompts padded to a fixed length, the last batch filled up, the fillers' outputs dropped.
"""

import pytest

from app.generation import HFGenerator, Sampling

PROMPTS = ["Question: 1 + 1 = ?", "Question: what is 12 times 7?", "Q", "Question: 3 + 4 = ?",
           "Question: a long question about apples and oranges and how many are left?"]


@pytest.fixture(scope="module")
def generators(tiny_model_dir):
    return HFGenerator(str(tiny_model_dir), {}, bf16=False, batch_size=2), \
        HFGenerator(str(tiny_model_dir), {}, bf16=False, batch_size=2, static_cache=True)


def test_static_cache_greedy_matches_the_default_path(generators):
    default, static = generators
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=8, stop=())
    ours = static.generate(PROMPTS, sampling)
    assert len(ours) == len(PROMPTS)  # 5 prompts in batches of 2: the filler of the last batch is dropped
    assert ours == default.generate(PROMPTS, sampling)
    assert static.stats.completions == len(PROMPTS)


def test_static_cache_returns_n_samples_per_prompt(generators):
    _, static = generators
    out = static.generate(PROMPTS[:3], Sampling(n=2, temperature=1.0, max_new_tokens=6, stop=()))
    assert [len(samples) for samples in out] == [2, 2, 2]
    assert all(0 < c.num_tokens <= 6 for samples in out for c in samples)


def test_generation_shows_progress_in_a_log_that_is_not_a_terminal(generators, capsys):
    """A pod's log is no terminal: tqdm's redraws become plain log lines (first, every 30 s, last)."""
    default, _ = generators
    default.generate(PROMPTS, Sampling(n=1, temperature=0.0, max_new_tokens=4, stop=()), desc="rollouts/direct")
    lines = [line for line in capsys.readouterr().out.splitlines() if "rollouts/direct [hf]" in line]
    assert len(lines) >= 2 and "0/3" in lines[0] and "100%" in lines[-1] and "3/3" in lines[-1]


def test_vllm_progress_is_log_lines_outside_a_terminal(capsys):
    from app.generation_vllm import _progress

    bar = _progress("eval/sft [vllm]")(total=4, desc="Processed prompts", dynamic_ncols=True)
    bar.update(4)
    bar.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if "eval/sft [vllm]" in line]
    assert lines and "4/4" in lines[-1]
