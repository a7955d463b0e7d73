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
