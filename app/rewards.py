"""Answer extraction and trajectory scoring, shared by rollouts, preferences and eval.

One extractor decides what a text's final answer is (as verl's `gsm8k.py` does):

    >>> extract_answer("Natalia sold 48/2 = 24 clips in May.\\n#### 72")
    '72'
    >>> extract_answer("So she earned $1,250.00 in total. The answer is $1,250.")
    '1250'

`strict` takes only the last `#### number`; `flexible` (the default) falls back to
"The answer is N", `\\boxed{N}`, then the last number in the text.

A trajectory's reward = correctness + quality_weight * reasoning quality - length
penalty. Reasoning quality rewards written equations that are arithmetically right
(`48/2 = 24`) and visible steps, so that among correct answers DPO can prefer the
one whose work checks out.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

_NUMBER = r"-?[\d,]*\.?\d+"
_HASH_ANSWER = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_PHRASE_ANSWER = re.compile(r"answer\s*(?:is|:)\s*[:=]?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_BOXED_ANSWER = re.compile(r"\\boxed\{\s*\$?\s*(" + _NUMBER + r")\s*\}")
_ANY_NUMBER = re.compile(_NUMBER)
_CALCULATOR = re.compile(r"<<[^>]*>>")
# "48/2 = 24", "0.2 x 50 = 10", "3 * $4 = $12": two operands, one operator, a result.
_EQUATION = re.compile(
    r"(?<![\w.])\$?(" + _NUMBER + r")\s*([-+*/x×÷])\s*\$?(" + _NUMBER + r")\s*=\s*\$?(" + _NUMBER + ")"
)
_TAIL_CHARS = 400  # only the end of a long text can hold its final answer


def normalize_number(text: str) -> str | None:
    """'1,250.00' -> '1250', '-3.50' -> '-3.5', '$7' -> '7'; None if it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if not cleaned or cleaned in ("-", "."):
        return None
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(round(value, 6)).rstrip("0").rstrip(".")


def extract_answer(text: str, method: str = "flexible") -> str | None:
    """The final numeric answer of a solution text, normalised, or None."""
    if method not in ("strict", "flexible"):
        raise ValueError(f"method must be 'strict' or 'flexible', not {method!r}")
    text = _CALCULATOR.sub("", text or "")
    hashes = _HASH_ANSWER.findall(text)
    if hashes:
        return normalize_number(hashes[-1])
    if method == "strict":
        return None
    tail = text[-_TAIL_CHARS:]
    for pattern in (_BOXED_ANSWER, _PHRASE_ANSWER):
        found = pattern.findall(tail)
        if found:
            return normalize_number(found[-1])
    numbers = [n for n in (normalize_number(m) for m in _ANY_NUMBER.findall(tail)) if n is not None]
    return numbers[-1] if numbers else None


def answers_match(predicted: str | None, gold: str | None) -> bool:
    if predicted is None or gold is None:
        return False
    try:
        return math.isclose(float(predicted), float(gold), rel_tol=1e-6, abs_tol=1e-6)
    except ValueError:
        return predicted == gold


def _apply(a: float, op: str, b: float) -> float | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in ("*", "x", "×"):
        return a * b
    if b == 0:
        return None
    return a / b


def check_equations(text: str) -> tuple[int, int]:
    """(equations written, equations arithmetically right) in a solution text."""
    text = _CALCULATOR.sub("", text or "")
    total = right = 0
    for left, op, rhs_operand, result in _EQUATION.findall(text):
        try:
            a, b, c = (float(v.replace(",", "")) for v in (left, rhs_operand, result))
        except ValueError:
            continue
        total += 1
        value = _apply(a, op, b)
        if value is not None and math.isclose(value, c, rel_tol=1e-4, abs_tol=1e-2):
            right += 1
    return total, right


def reasoning_quality(text: str) -> float:
    """0..1: share of equations that are right (70%) and whether it shows >= 2 steps (30%)."""
    total, right = check_equations(text)
    lines = [line for line in (text or "").splitlines() if _ANY_NUMBER.search(line) and "####" not in line]
    steps = min(len(lines), 2) / 2
    accuracy = right / total if total else 0.0
    return round(0.7 * accuracy + 0.3 * steps, 4)


@dataclass(frozen=True)
class RewardWeights:
    quality: float = 0.5
    length: float = 0.2
    target_tokens: int = 200  # no penalty up to here; GSM8K solutions are ~130 tokens

    def length_penalty(self, num_tokens: int, max_tokens: int) -> float:
        """0 up to target_tokens, rising linearly to 1 at max_tokens."""
        if num_tokens <= self.target_tokens or max_tokens <= self.target_tokens:
            return 0.0
        return round(min(1.0, (num_tokens - self.target_tokens) / (max_tokens - self.target_tokens)), 4)


@dataclass(frozen=True)
class Score:
    answer: str | None
    correct: bool
    quality: float
    length_penalty: float
    reward: float
    truncated: bool

    def to_dict(self) -> dict:
        return asdict(self)


def score_trajectory(text: str, gold: str, num_tokens: int, max_tokens: int, truncated: bool = False,
                     weights: RewardWeights = RewardWeights()) -> Score:
    answer = extract_answer(text)
    # A cut-off trajectory has no final answer of its own; whatever number it ended on is not one.
    correct = (not truncated) and answers_match(answer, gold)
    quality = reasoning_quality(text)
    penalty = weights.length_penalty(num_tokens, max_tokens)
    reward = round(float(correct) + weights.quality * quality - weights.length * penalty, 4)
    return Score(answer=answer, correct=correct, quality=quality, length_penalty=penalty, reward=reward,
                 truncated=truncated)
