"""Prompt formats and the rollout variants.

The base format must match what the model was trained on: Abel-7B-002 expects

    Question:
    <question>
    Answer:
    Let's think step by step.

`--prompt-format abel` (default) gives that; `plain` gives "Q: ...\\nA:", and `chat`
uses the tokenizer's own chat template. SFT teaches a tutoring style on top: the
instruction line tells the model to work step by step and end with `#### <number>`,
which is what the answer extractor reads.

Rollouts sample the same question under three instructions, so the preference data
covers more than one way of reasoning:

    direct        solve it, showing the steps
    reflective    solve it, then check each calculation before the final answer
    deliberative  first say what is asked and plan, then compute
"""

from __future__ import annotations

import re

TUTOR = "You are a patient math tutor. Solve the problem step by step and end with '#### <number>'."
VARIANTS: dict[str, str] = {
    "direct": TUTOR,
    "reflective": TUTOR + " Before the final line, check each calculation once more.",
    "deliberative": TUTOR + " First state what is asked and plan the steps, then compute.",
}
FORMATS = ("abel", "plain", "chat")
STOP_STRINGS = ("\nQuestion:", "\n\nQ:")
_CALCULATOR = re.compile(r"<<[^>]*>>")


def build_prompt(question: str, variant: str = "direct", prompt_format: str = "abel", tokenizer=None) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown prompt variant {variant!r}; choose from {', '.join(VARIANTS)}")
    instruction = VARIANTS[variant]
    if prompt_format == "abel":
        return f"{instruction}\nQuestion:\n{question}\nAnswer:\nLet's think step by step.\n"
    if prompt_format == "plain":
        return f"{instruction}\nQ: {question}\nA:"
    if prompt_format == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt format 'chat' needs a tokenizer with a chat template")
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt format {prompt_format!r}; choose from {', '.join(FORMATS)}")


def sft_target(reference_solution: str) -> str:
    """GSM8K's solution without the calculator annotations, ending in '#### N'."""
    return _CALCULATOR.sub("", reference_solution).strip()


def cut_at_stop(text: str, stops: tuple[str, ...] = STOP_STRINGS) -> tuple[str, bool]:
    """(text up to the first stop string, whether one was found)."""
    positions = [text.find(s) for s in stops if s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True
