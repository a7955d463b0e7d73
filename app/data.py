"""GSM8K-format problems: from the hub, a JSONL file (local or s3://), or a built-in generator.

A data spec is one string, so it fits a flag, an environment variable or a ConfigMap:

    hf:openai/gsm8k               the hub dataset (split chosen by the phase: train or test)
    hf:madrylab/gsm8k-platinum    GSM8K-Platinum (test split)
    synthetic:1200                1200 generated word problems (seeded), for the demo and tests
    synthetic-test:200            a disjoint generated set for evaluation
    synthetic-hard:20000          the harder family (2-4 steps, numbers up to the thousands,
                                  distractor sentences), for the `small` proving ground
    synthetic-hard-val:1000       its validation split, for choosing settings
    synthetic-hard-test:1000      its test split, for reporting (train, val, test never overlap)
    /data/train.jsonl             a JSONL file with "question" and "answer" per line
    s3://bucket/gsm8k/train.jsonl the same, in S3

Every row becomes a `Problem` whose `gold` is extracted once, here, with the same
extractor rewards and eval use. Malformed rows raise an `InputError` naming the file,
the line and the field; rows whose gold answer does not parse are rejected and
counted, and the load fails past `max_reject_rate` instead of silently training on less.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from app.errors import ConfigError, InputError
from app.rewards import extract_answer


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # the reference solution, ending in "#### <number>"
    gold: str  # the normalised final number

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    rejected: int = 0
    reasons: dict | None = None

    def line(self) -> str:
        text = f"{self.source}: {self.rows - self.rejected} usable of {self.rows} rows"
        if self.rejected:
            text += f" ({self.rejected} rejected: " + ", ".join(f"{k} x{v}" for k, v in (self.reasons or {}).items()) + ")"
        return text


ACCEPT_UNMARKED_HELP = ("accept gold answers without GSM8K's '#### N' marker, taking the last number in the "
                        "solution as the answer (and appending '#### N' to it); without this such rows are "
                        "rejected and counted under --max-reject-rate")


def load_problems(spec: str, split: str = "train", limit: int | None = None, max_reject_rate: float = 0.01,
                  seed: int = 0, accept_unmarked: bool = False) -> tuple[list[Problem], LoadReport]:
    """Problems for a data spec (see the module docstring), in a stable order. A gold answer must end
    in '#### N'; `accept_unmarked` takes the last number of a solution without it instead."""
    if not spec:
        raise ConfigError("empty data spec")
    if spec.startswith("synthetic"):
        rows, source = _synthetic_rows(spec, split, seed), spec
    elif spec.startswith("hf:"):
        rows, source = _hub_rows(spec[3:], split), spec
    else:
        rows, source = _jsonl_rows(spec), spec
    problems, report = _to_problems(rows, source, accept_unmarked)
    if report.rows == 0 or not problems:
        raise InputError(f"{source}: no usable rows (empty dataset)")
    if report.rejected / report.rows > max_reject_rate:
        raise InputError(f"{report.line()}; over the allowed reject rate {max_reject_rate:.1%}")
    if limit is not None:
        problems = problems[:limit]
    return problems, report


def _to_problems(rows: list[tuple[str, int, dict]], source: str,
                 accept_unmarked: bool = False) -> tuple[list[Problem], LoadReport]:
    report = LoadReport(source=source, reasons={})
    problems = []
    for where, line_number, row in rows:
        report.rows += 1
        for field in ("question", "answer"):
            if field not in row:
                raise InputError(f"{where}:{line_number}: missing field '{field}'")
            if not isinstance(row[field], str):
                raise InputError(f"{where}:{line_number}: field '{field}' must be a string, "
                                 f"not {type(row[field]).__name__}")
        if not row["question"].strip():
            _reject(report, "empty question")
            continue
        answer = row["answer"].strip()
        gold = extract_answer(answer, method="strict")
        if gold is None:
            gold = extract_answer(answer)
            if gold is None:
                _reject(report, "gold answer does not parse")
                continue
            if not accept_unmarked:
                _reject(report, "gold answer without '#### N'")
                continue
            answer = f"{answer}\n#### {gold}"
        problem_id = str(row.get("id", f"{Path(where).stem}-{line_number}"))
        problems.append(Problem(id=problem_id, question=row["question"].strip(), answer=answer, gold=gold))
    return problems, report


def _reject(report: LoadReport, reason: str) -> None:
    report.rejected += 1
    report.reasons[reason] = report.reasons.get(reason, 0) + 1


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises naming file and line."""
    out = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{line_number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                 f"{exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:  # column of the line (exc.colno counts from a newline in it)
                raise InputError(f"{path}:{line_number}: malformed JSON ({exc.msg} at column {exc.pos + 1})") from None
            if not isinstance(value, dict):
                raise InputError(f"{path}:{line_number}: expected a JSON object, got {type(value).__name__}")
            out.append((line_number, value))
    return out


def write_jsonl(path: str | Path, rows) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def _jsonl_rows(spec: str) -> list[tuple[str, int, dict]]:
    from app.artifacts import is_s3

    if is_s3(spec):
        from app.artifacts import local_copy

        path = local_copy(spec)
    else:
        path = local_file(spec)
    return [(spec, n, row) for n, row in read_jsonl(path)]


def check_data_spec(spec: str, flag: str) -> None:
    """Fail (exit 3) at once when a data spec names a JSONL file or object that is not there, or a
    directory: called before any model or data loads. Hub and generated specs are checked on loading."""
    from app.artifacts import is_s3, open_store

    if not spec or spec.startswith(("synthetic", "hf:")):
        return
    if is_s3(spec):
        backend, key = open_store(spec)
        if not key or spec.endswith("/"):
            raise InputError(f"{flag} {spec}: name a JSONL object (s3://bucket/path/file.jsonl), not a prefix")
        if backend.size(key) is None:  # type: ignore[attr-defined]
            raise InputError(f"{flag} {spec}: no such object")
        return
    try:
        local_file(spec)
    except InputError as exc:
        raise InputError(f"{flag} {exc}") from None


def local_file(spec: str) -> Path:
    """The local JSONL file a spec names, or an InputError saying what it is instead."""
    path = Path(spec).expanduser()
    if path.is_dir():
        raise InputError(f"{spec}: is a directory; give a JSONL file (one problem per line)")
    if not path.exists():  # a named pipe or /dev/fd/N (`--train-data <(zcat train.jsonl.gz)`) is a file too
        raise InputError(f"{spec}: no such file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{spec}: not readable")
    return path


def _hub_rows(name: str, split: str) -> list[tuple[str, int, dict]]:
    import datasets

    if name.endswith("gsm8k-platinum"):
        split = "test"  # Platinum is a cleaned test set only
    dataset = datasets.load_dataset(name, "main", split=split)
    return [(f"hf:{name}[{split}]", i + 1, dict(row)) for i, row in enumerate(dataset)]


# ---------------------------------------------------------------------------------------------
# Synthetic GSM8K-format problems: one or two arithmetic steps over small numbers, phrased as
# word problems, with solutions in GSM8K's own style (calculator annotations and "#### N").

_NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Leo", "Mia", "Ned"]
_ITEMS = ["apples", "books", "cards", "pens", "shells", "stickers", "marbles", "coins", "eggs", "plums"]


def _problem(rng: random.Random) -> tuple[str, str]:
    # Operands stay small (mostly one digit) so a 4-layer model can learn the arithmetic in
    # minutes on a CPU; the wording and the solution format are GSM8K's.
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        q = f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?"
        steps = [(f"{name} has {a} + {b} = ", a, "+", b, f" {item}.")]
    elif kind == 1:
        b, left = rng.randint(2, 9), rng.randint(1, 9)
        a = left + b
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        steps = [(f"{name} has {a} - {b} = ", a, "-", b, f" {item} left.")]
    elif kind == 2:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        q = f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have?"
        steps = [(f"{name} has {a} * {b} = ", a, "*", b, f" {item}.")]
    elif kind == 3:
        b, per = rng.randint(2, 5), rng.randint(2, 5)
        a = b * per
        q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
        steps = [(f"Each friend gets {a} / {b} = ", a, "/", b, f" {item}.")]
    else:
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 4)
        q = (f"{name} has {a} {item}, buys {b} more, then buys {c} packs of 2 {item}. "
             f"How many {item} does {name} have?")
        first, second = a + b, c * 2
        steps = [(f"After the first purchase {name} has {a} + {b} = ", a, "+", b, f" {item}."),
                 (f"The packs hold {c} * 2 = ", c, "*", 2, f" {item}."),
                 (f"In total {name} has {first} + {second} = ", first, "+", second, f" {item}.")]
    lines, result = [], 0
    for prefix, x, op, y, suffix in steps:
        result = {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]
        lines.append(f"{prefix}<<{x}{op}{y}={result}>>{result}{suffix}")
    return q, "\n".join(lines) + f"\n#### {result}"


def synthetic_problems(n: int, seed: int = 0, stream: str = "train") -> list[dict]:
    """`n` generated problems; the train and test streams never share a question."""
    # A hash of the question's text decides its stream, so train and test never overlap.
    return _generate(n, random.Random(f"{stream}-{seed}"), _problem, f"syn-{stream}",
                     lambda question: (stream == "test") == (hash_bucket(question) == 0))


HARD_STREAMS = {"test": (0,), "val": (1,), "train": (2, 3, 4)}  # hash buckets of each split


def synthetic_hard_problems(n: int, seed: int = 0, stream: str = "train") -> list[dict]:
    """`n` problems of the harder family; the train, val and test streams never share a question."""
    if stream not in HARD_STREAMS:
        raise ConfigError(f"synthetic-hard stream {stream!r}: use train, val or test")
    return _generate(n, random.Random(f"hard-{stream}-{seed}"), _hard_problem, f"syn-hard-{stream}",
                     lambda question: hash_bucket(question) in HARD_STREAMS[stream])


def _generate(n: int, rng: random.Random, make, id_prefix: str, keep) -> list[dict]:
    out, seen = [], set()
    while len(out) < n:
        question, answer = make(rng)
        if not keep(question) or question in seen:
            continue
        seen.add(question)
        out.append({"id": f"{id_prefix}-{len(out)}", "question": question, "answer": answer})
    return out


# The harder family: a running count changed by 2-4 operations (one of them may take two lines
# of solution), operands up to the hundreds, results up to the thousands, and 0-2 sentences
# that mention numbers the answer does not use. A model has to track which number matters.

_DISTRACTORS = ["{other} is {n} years old.", "The shop is {n} meters from {name}'s house.",
                "{other} has {n} {other_item}.", "It rained on {n} days last month.",
                "A bus ticket costs {n} dollars.", "{name}'s class has {n} students."]
_HARD_LIMIT = 2000


def _hard_step(rng: random.Random, x: int, name: str, other: str, item: str) -> tuple[str, list[tuple]]:
    """One operation on the count `x`: (sentence, [(solution prefix, a, op, b, suffix), ...])."""
    kind = rng.choice(["add", "sub", "mul", "packs", "div"])
    if kind == "mul" and x * 2 > _HARD_LIMIT or kind == "div" and not [k for k in (2, 3, 4, 5) if x % k == 0]:
        kind = "sub" if x > 20 else "add"
    if x < 10 or x > _HARD_LIMIT - 250:  # keep the count positive and under the limit
        kind = "add" if x < 10 else "sub"
    if kind == "add":
        b = rng.randint(10, 250)
        return f"{name} buys {b} more {item}.", [(f"After buying more, {name} has {x} + {b} = ", x, "+", b, f" {item}.")]
    if kind == "sub":
        b = rng.randint(1, max(1, x - 1))
        return (f"{name} gives {b} {item} to {other}.",
                [(f"After giving some away, {name} has {x} - {b} = ", x, "-", b, f" {item}.")])
    if kind == "mul":
        k = rng.randint(2, min(4, _HARD_LIMIT // x))
        return (f"{name} ends up with {k} times as many {item} as before.",
                [(f"Then {name} has {x} * {k} = ", x, "*", k, f" {item}.")])
    if kind == "packs":
        k, m = rng.randint(2, 9), rng.randint(3, 25)
        return (f"{name} buys {k} packs with {m} {item} in each pack.",
                [(f"The packs hold {k} * {m} = ", k, "*", m, f" {item}."),
                 (f"Now {name} has {x} + {k * m} = ", x, "+", k * m, f" {item}.")])
    k = rng.choice([k for k in (2, 3, 4, 5) if x % k == 0])
    return (f"{name} splits the {item} into {k} equal groups and keeps one group.",
            [(f"One group holds {x} / {k} = ", x, "/", k, f" {item}.")])


def _hard_problem(rng: random.Random) -> tuple[str, str]:
    name, other = rng.sample(_NAMES, 2)
    item, other_item = rng.sample(_ITEMS, 2)
    x = rng.randint(20, 300)
    sentences, steps = [f"{name} has {x} {item}."], []
    for _ in range(rng.randint(2, 4)):
        sentence, lines = _hard_step(rng, x, name, other, item)
        sentences.append(sentence)
        for prefix, a, op, b, suffix in lines:
            x = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            steps.append(f"{prefix}<<{a}{op}{b}={x}>>{x}{suffix}")
    for _ in range(rng.randint(0, 2)):
        distractor = rng.choice(_DISTRACTORS).format(name=name, other=other, other_item=other_item,
                                                     n=rng.randint(3, 90))
        sentences.insert(rng.randint(1, len(sentences)), distractor)
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return question, "\n".join(steps) + f"\n#### {x}"


def hash_bucket(text: str, buckets: int = 5) -> int:
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % buckets


SYNTHETIC_KINDS = ("synthetic", "synthetic-test", "synthetic-hard", "synthetic-hard-val", "synthetic-hard-test")


def _synthetic_rows(spec: str, split: str, seed: int) -> list[tuple[str, int, dict]]:
    kind, _, count = spec.partition(":")
    if kind not in SYNTHETIC_KINDS or not count.isdigit() or int(count) <= 0:
        raise ConfigError(f"data spec {spec!r}: use {':N, '.join(SYNTHETIC_KINDS)}:N with N > 0")
    if kind.endswith("-val"):
        stream = "val"
    else:
        stream = "test" if kind.endswith("-test") or split == "test" else "train"
    generate = synthetic_hard_problems if kind.startswith("synthetic-hard") else synthetic_problems
    rows = generate(int(count), seed=seed, stream=stream)
    return [(spec, i + 1, row) for i, row in enumerate(rows)]
