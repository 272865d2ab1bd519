"""Tasks: spec parsing, disjoint and stable splits, seeded sampling, grading, and user-facing errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from foundation.errors import UserError
from orchestrator.tasks import TASK_SPECS_HELP, Problem, Task, get_task
from orchestrator.tasks.answers import extract_boxed, parse_number
from orchestrator.tasks.arithmetic import ArithmeticTask
from orchestrator.tasks.gsm8k import GSM8KTask, gold_answer
from orchestrator.tasks.jsonl import JsonlTask
from orchestrator.tasks.math import MathTask

DATA = Path(__file__).resolve().parents[1] / "orchestrator" / "tasks" / "data"

# (spec, normalised name, family, how many problems to compare per split for disjointness)
BUILTIN = [
    ("arithmetic", "arithmetic", "arithmetic", 3000),
    ("arithmetic:easy", "arithmetic:easy", "arithmetic", None),  # None: the whole pool
    ("arithmetic:medium", "arithmetic:medium", "arithmetic", None),
    ("gsm8k", "gsm8k", "gsm8k", None),
    ("math", "math:1-3", "math", None),
    ("math:all", "math:1-5", "math", None),
    ("math:4", "math:4", "math", None),
    ("math:2-4", "math:2-4", "math", None),
]


def _pool_size(task: Task, split: str) -> int:
    """The size of a split, read from the UserError a too-large request gets."""
    draw = task.train_problems if split == "train" else task.eval_problems
    with pytest.raises(UserError, match=r"at most (\d+)") as err:
        draw(10**7, 0)
    return int(str(err.value).rsplit("at most ", 1)[1].split()[0])


def _all(task: Task, split: str, limit: int | None) -> list[Problem]:
    n = limit if limit is not None else _pool_size(task, split)
    return task.train_problems(n, 0) if split == "train" else task.eval_problems(n, 0)


# --- specs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "name", "family", "_limit"), BUILTIN)
def test_get_task_names_and_families(spec: str, name: str, family: str, _limit: int | None) -> None:
    task = get_task(spec)
    assert task.name == name
    assert task.family == family


def test_get_task_is_case_and_space_insensitive() -> None:
    assert get_task("  GSM8K ").name == "gsm8k"
    assert get_task("Math:4").name == "math:4"
    assert get_task("math:3-3").name == "math:3"


def test_unknown_spec_names_the_choices() -> None:
    with pytest.raises(UserError) as err:
        get_task("arithmetc")
    message = str(err.value)
    assert "'arithmetc'" in message
    for choice in ("arithmetic:easy", "gsm8k", "math:all", ".jsonl"):
        assert choice in message
    assert "\n" not in message


@pytest.mark.parametrize("spec", ["math:0", "math:6", "math:4-2", "math:x", "math:1-9", "math:"])
def test_bad_math_levels(spec: str) -> None:
    with pytest.raises(UserError, match=r"bad MATH levels.*math:all"):
        get_task(spec)


def test_help_lists_every_builtin_spec() -> None:
    for spec in ("arithmetic", "arithmetic:easy", "arithmetic:medium", "gsm8k", "math", "math:all", ".jsonl"):
        assert spec in TASK_SPECS_HELP


def test_path_specs_are_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        get_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        get_task(str(tmp_path / "problems.txt"))  # a separator makes it a path too
    with pytest.raises(UserError, match="is a directory"):
        get_task(str(tmp_path) + "/")


def test_importing_tasks_does_not_load_sympy() -> None:
    code = (
        "import sys; from orchestrator.tasks import get_task; "
        "t = get_task('gsm8k'); t.equivalent('1', '1.0'); get_task('math'); "
        "print('sympy' in sys.modules, 'math_verify' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["False", "False"]


# --- splits and sampling ------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "_name", "_family", "limit"), BUILTIN)
def test_train_and_eval_are_disjoint(spec: str, _name: str, _family: str, limit: int | None) -> None:
    task = get_task(spec)
    train, held_out = _all(task, "train", limit), _all(task, "eval", limit)
    assert train and held_out
    assert not {p.id for p in train} & {p.id for p in held_out}
    norm = lambda q: " ".join(q.split())  # noqa: E731
    assert not {norm(p.question) for p in train} & {norm(p.question) for p in held_out}
    assert len({p.id for p in train}) == len(train)  # ids are unique within a split too
    assert len({p.id for p in held_out}) == len(held_out)


@pytest.mark.parametrize("spec", ["arithmetic", "arithmetic:easy", "gsm8k", "math"])
def test_eval_set_does_not_depend_on_train_size(spec: str) -> None:
    a, b = get_task(spec), get_task(spec)
    a.train_problems(5, 0)
    b.train_problems(80, 123)
    assert a.eval_problems(40, 7) == b.eval_problems(40, 7)


@pytest.mark.parametrize("spec", ["arithmetic", "arithmetic:medium", "gsm8k", "math:all"])
def test_sampling_is_seeded(spec: str) -> None:
    task = get_task(spec)
    first = [p.id for p in task.train_problems(30, 1)]
    assert first == [p.id for p in get_task(spec).train_problems(30, 1)]  # a fresh instance agrees
    assert first != [p.id for p in task.train_problems(30, 2)]
    assert len(set(first)) == 30  # without replacement


@pytest.mark.parametrize("spec", ["arithmetic", "arithmetic:easy", "gsm8k", "math"])
def test_smaller_draw_is_a_prefix(spec: str) -> None:
    task = get_task(spec)
    assert task.eval_problems(10, 3) == task.eval_problems(30, 3)[:10]


def test_too_many_problems_names_the_maximum() -> None:
    task = get_task("arithmetic:easy")
    train, held_out = _pool_size(task, "train"), _pool_size(task, "eval")
    assert train + held_out == 21 * 21  # every a+b over 0..20, each in exactly one split
    assert len(task.eval_problems(held_out, 0)) == held_out
    with pytest.raises(UserError, match=f"task 'arithmetic:easy' has only {held_out} eval problems"):
        task.eval_problems(held_out + 1, 0)
    with pytest.raises(UserError, match="0 or more"):
        task.train_problems(-1, 0)
    with pytest.raises(UserError, match="at most 100000"):
        get_task("arithmetic").train_problems(100_001, 0)


def test_zero_problems() -> None:
    assert get_task("gsm8k").eval_problems(0, 0) == []


# --- arithmetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["arithmetic", "arithmetic:easy", "arithmetic:medium"])
def test_arithmetic_answers_are_right(spec: str) -> None:
    task = get_task(spec)
    for p in task.train_problems(50, 0) + task.eval_problems(50, 0):
        assert p.id == f"{spec}/{p.question}"
        assert int(p.answer) == eval(p.question)  # noqa: S307 - digits and + - * only
        assert set(p.question) <= set("0123456789+-*")


def test_arithmetic_operand_ranges() -> None:
    def operands(spec: str) -> list[int]:
        task = get_task(spec)
        qs = [p.question for p in task.train_problems(200, 0)]
        return [int(x) for q in qs for x in q.replace("*", "+").replace("-", "+").split("+")]

    assert max(operands("arithmetic")) <= 29 and min(operands("arithmetic")) >= 0
    assert max(operands("arithmetic:easy")) <= 20
    assert max(operands("arithmetic:medium")) <= 10
    assert {get_task("arithmetic").train_problems(1, 0)[0].question.count(op) for op in "+-*"} == {1, 2}


def test_arithmetic_split_is_by_expression() -> None:
    """The same expression lands in the same split whichever seed or size drew it."""
    task = ArithmeticTask("arithmetic:easy")
    train_ids = {p.id for p in task.train_problems(_pool_size(task, "train"), 5)}
    assert ("arithmetic:easy/3+4" in train_ids) != (
        "arithmetic:easy/3+4" in {p.id for p in task.eval_problems(_pool_size(task, "eval"), 9)}
    )


def test_arithmetic_grading() -> None:
    task = get_task("arithmetic")
    problem = Problem(id="x", question="1+2*3+4-5*6", answer="-19")
    assert task.extract_answer("1 + 6 + 4 - 30 = -19") == "-19"
    assert task.is_correct(task.extract_answer("So the result is -19."), problem)
    assert task.is_correct(task.extract_answer(r"\boxed{-19.0}"), problem)
    assert not task.is_correct(task.extract_answer("So the result is 19."), problem)
    assert not task.is_correct(task.extract_answer("I don't know"), problem)
    assert task.extract_answer("I don't know") is None


# --- GSM8K --------------------------------------------------------------------------------------


def test_gsm8k_gold_answers_all_parse() -> None:
    task = GSM8KTask()
    problems = task.eval_problems(1319, 0)
    assert len({p.id for p in problems}) == 1319
    for p in problems:
        value = parse_number(p.answer, lenient=False)
        assert value is not None, p.id
        assert "," not in p.answer


def test_gsm8k_ids_point_at_lines() -> None:
    task = GSM8KTask()
    p = next(p for p in task.eval_problems(1319, 0) if p.id == "gsm8k/test/0")
    first = json.loads((DATA / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert p.question == first["question"]
    assert p.answer == "18"
    assert p.meta["solution"] == first["answer"]
    assert all(p.id.startswith("gsm8k/train/") for p in task.train_problems(20, 0))


def test_gsm8k_gold_answer() -> None:
    assert gold_answer("She has 1,000 + 234 = <<1000+234=1234>>1,234.\n#### 1,234") == "1234"
    with pytest.raises(ValueError):
        gold_answer("no final line")


def test_gsm8k_grading() -> None:
    task = get_task("gsm8k")
    problem = Problem(id="x", question="?", answer="1234")
    assert task.is_correct(task.extract_answer(r"In total \boxed{\$1,234}."), problem)
    assert task.is_correct(task.extract_answer("She earns $1,234.00 a week."), problem)
    assert not task.is_correct(task.extract_answer(r"\boxed{1,235}"), problem)
    assert not task.is_correct(None, problem)
    assert task.equivalent("5", "5.00") and task.equivalent("0.5", "1/2")
    assert task.equivalent(task.extract_answer(r"\boxed{12 apples}") or "", "12")


# --- MATH ---------------------------------------------------------------------------------------


def test_math_level_filtering() -> None:
    def levels(spec: str, split: str) -> set[int]:
        return {p.meta["level"] for p in _all(get_task(spec), split, None)}

    assert levels("math", "train") == {1, 2, 3}
    assert levels("math", "eval") == {1, 2, 3}
    assert levels("math:4", "eval") == {4}
    assert levels("math:2-4", "train") == {2, 3, 4}
    assert levels("math:all", "eval") == {1, 2, 3, 4, 5}
    # Counts from data/README.md: MATH-500 levels 1-3 are 43 + 90 + 105 problems.
    assert _pool_size(get_task("math"), "eval") == 238
    assert _pool_size(get_task("math:4"), "eval") == 128
    # 7500 train problems minus 2 with no level and 2 with an empty answer.
    assert _pool_size(get_task("math:all"), "train") == 7496


def test_math_problem_fields() -> None:
    problems = get_task("math:all").eval_problems(500, 0)
    assert all(p.id.startswith("test/") and p.id.endswith(".json") for p in problems)
    assert all(p.answer.strip() for p in get_task("math:all").train_problems(7496, 0))


@pytest.mark.parametrize("filename", ["test500.jsonl", "train.jsonl"])
def test_extract_boxed_reads_every_math_solution(filename: str) -> None:
    """The data's answers were made by brace-matching the last box; our extractor must agree on all."""
    for line in (DATA / "math" / filename).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert (extract_boxed(row["solution"]) or "") == row["answer"].strip(), row["unique_id"]


@pytest.fixture(scope="module")
def math_task() -> MathTask:
    return MathTask()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac12", "1/2"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)"),
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
        (r"(-\infty, 3]", r"(-\infty,3]"),
        ("[2,5)", r"2 \le x < 5"),  # math-verify accepts this one way only; we are symmetric
        (r"\text{(C)}", "C"),
        (r"\text{(C)}", "(C)"),
        (r"90^\circ", "90"),
        (r"864 \mbox{ inches}^2", "864"),
        (r"\$18", "18"),
        ("x^2+2x+1", "(x+1)^2"),
        (r"3\sqrt{2}", r"\sqrt{18}"),
        (r"\{1,2\}", r"\{2,1\}"),
        ("5.00", "5"),
    ],
)
def test_math_equivalent(math_task: MathTask, a: str, b: str) -> None:
    assert math_task.equivalent(a, b)
    assert math_task.equivalent(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (r"(-\infty, 3]", r"(-\infty, 3)"),
        (r"\text{(C)}", r"\text{(D)}"),
        ("5x", "5"),
        ("0.333", r"\frac{1}{3}"),
        ("(1,2)", "(2,1)"),
        (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}"),
        ("3", r"\text{three and a half}"),
    ],
)
def test_math_not_equivalent(math_task: MathTask, a: str, b: str) -> None:
    assert not math_task.equivalent(a, b)
    assert not math_task.equivalent(b, a)


def test_math_extraction_is_box_only(math_task: MathTask) -> None:
    assert math_task.extract_answer(r"... so $x = \boxed{\frac{\sqrt{2}}{2}}$.") == r"\frac{\sqrt{2}}{2}"
    assert math_task.extract_answer("The answer is 5.") is None
    problem = Problem(id="x", question="?", answer=r"\frac{\sqrt{2}}{2}")
    assert math_task.is_correct(math_task.extract_answer(r"\boxed{\frac{1}{\sqrt{2}}}"), problem)


def test_math_grading_works_off_the_main_thread(math_task: MathTask) -> None:
    """math-verify's SIGALRM timeouts fail outside the main thread; symbolic grading must still work."""
    results: list[bool] = []
    fresh = MathTask()  # no cached parses from the main thread
    worker = threading.Thread(
        target=lambda: results.extend(
            [
                fresh.equivalent(r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"),
                fresh.equivalent("[1,2)", "[1,2]"),
            ]
        )
    )
    worker.start()
    worker.join(timeout=60)
    assert results == [True, False]


# --- JSONL --------------------------------------------------------------------------------------


def _write(tmp_path: Path, lines: list[str], name: str = "mine.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_with_explicit_splits(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            json.dumps({"question": "1+1?", "answer": 2, "split": "train"}),
            "",
            json.dumps({"problem": "Half of 1?", "answer": r"\frac{1}{2}", "split": "test", "id": "h"}),
            json.dumps({"question": "2+2?", "answer": "4", "split": "TRAIN"}),
        ],
    )
    task = get_task(str(path))
    assert isinstance(task, JsonlTask) and task.family == "math" and task.name == str(path)
    train = task.train_problems(2, 0)
    assert sorted(p.id for p in train) == ["mine/1", "mine/4"]
    assert {p.answer for p in train} == {"2", "4"}
    (held_out,) = task.eval_problems(1, 0)
    assert held_out.id == "h" and held_out.question == "Half of 1?"
    with pytest.raises(UserError, match="has only 1 eval problems"):
        task.eval_problems(2, 0)
    assert task.is_correct(task.extract_answer(r"\boxed{0.5}"), held_out)
    assert task.is_correct(task.extract_answer(r"\boxed{2/4}"), held_out)
    assert not task.is_correct(task.extract_answer("0.5"), held_out)  # no box, no answer


def test_jsonl_without_splits_holds_out_a_fifth_by_question(tmp_path: Path) -> None:
    rows = [json.dumps({"question": f"What is {i} squared?", "answer": i * i}) for i in range(200)]
    task = get_task(str(_write(tmp_path, rows)))
    n_train, n_eval = _pool_size(task, "train"), _pool_size(task, "eval")
    assert n_train + n_eval == 200
    assert 20 <= n_eval <= 60
    held_out = {p.question for p in task.eval_problems(n_eval, 0)}
    # Reordering the file moves no problem between splits.
    shuffled = get_task(str(_write(tmp_path, rows[::-1], "reversed.jsonl")))
    assert {p.question for p in shuffled.eval_problems(n_eval, 0)} == held_out


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        ([], "is empty"),
        (["", "   "], "is empty"),
        (['{"question": "a", "answer": 1}', "{not json"], "line 2 is not valid JSON"),
        (['{"question": "a", "answer": 1}', "[1, 2]"], "line 2 is not a JSON object"),
        (
            ['{"question": "a", "answer": 1}', "", '{"answer": 1}'],
            r"line 3 has no 'question' \(or 'problem'\)",
        ),
        (['{"question": "a"}'], "line 1 has no 'answer'"),
        (['{"question": "a", "answer": true}'], "line 1 has no 'answer'"),
        (['{"question": "a", "answer": ""}'], "line 1 has an empty or non-scalar 'answer'"),
        (['{"question": "a", "answer": [1]}'], "line 1 has an empty or non-scalar 'answer'"),
        (['{"question": "a", "answer": 1, "split": "dev"}'], "line 1 has split 'dev'"),
        (
            ['{"question": "a", "answer": 1, "id": 7}', '{"question": "b", "answer": 2, "id": "7"}'],
            "line 2 repeats id '7' from line 1",
        ),
        (
            [
                '{"question": "a  b", "answer": 1, "split": "train"}',
                '{"question": "a b", "answer": 1, "split": "test"}',
            ],
            "line 2 has the same question as line 1",
        ),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, lines: list[str], pattern: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(UserError, match=pattern) as err:
        get_task(str(path))
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_jsonl_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"question": "caf\u00e9", "answer": 1}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        get_task(str(path))
