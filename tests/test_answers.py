"""Answer extraction and exact numeric comparison: the cases that models actually produce."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

from orchestrator.tasks.answers import (
    extract_boxed,
    extract_numeric_answer,
    format_number,
    last_number,
    normalize_text,
    numbers_equal,
    numeric_equivalent,
    parse_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is \boxed{42}.", "42"),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),  # nested braces
        (r"first \boxed{1}, then on reflection \boxed{2}", "2"),  # several boxes: the last wins
        (r"$\boxed{ 7 }$", "7"),  # surrounding spaces are not part of the answer
        (r"\fbox{(C)}", "(C)"),
        (r"\boxed 5$.", "5"),  # the brace-less form found in MATH solutions
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
        (r"\boxed{\left\{ x \mid x>0 \right.}", r"\left\{ x \mid x>0 \right."),  # ... nor open one
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\text{(C)}}", r"\text{(C)}"),
        ("The answer is 12.", None),  # no box at all
        ("", None),
        (r"\boxed{12", None),  # never closed (truncated output)
        (r"\boxed{3} and finally \boxed{4", None),  # the last box is unreadable: no earlier fallback
        (r"\boxed{}", None),  # empty
        (r"\boxedfoo{3}", None),  # a different command
        (r"\boxed5", None),  # TeX needs a space before a brace-less argument
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She paid $1,234 in total.", "1234"),
        ("1,000,000 grains", "1000000"),
        ("The result is -3.", "-3"),
        ("x = \u22127", "-7"),  # unicode minus
        ("27-5 = 22", "22"),
        ("5-3", "3"),  # subtraction, not a negative number
        ("The area is 12 cm^2", "12"),  # the exponent is not the answer
        ("it costs 5.00 dollars", "5.00"),
        ("about .5 of them", ".5"),
        ("3/4 of the cake", "3/4"),
        (r"that is $\frac{3}{4}$", "3/4"),
        ("1, 2, 3", "3"),
        ("x_2 is unknown, so 9", "9"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,234", Fraction(1234)),
        (r"\$5", Fraction(5)),
        ("12 apples", Fraction(12)),
        ("5 cm^2", Fraction(5)),
        (r"5\text{ cm}^2", Fraction(5)),
        ("5.00", Fraction(5)),
        (".5", Fraction(1, 2)),
        ("5.", Fraction(5)),
        (r"\frac{1}{2}", Fraction(1, 2)),
        (r"\dfrac{-3}{4}", Fraction(-3, 4)),
        (r"-\frac12", Fraction(-1, 2)),
        ("1/2", Fraction(1, 2)),
        ("-3", Fraction(-3)),
        ("\u22123", Fraction(-3)),
        (r"\text{5}", Fraction(5)),
        (r"1\!000", Fraction(1000)),
        (r"1{,}000", Fraction(1000)),
        ("50%", Fraction(50)),
        (r"90^\circ", Fraction(90)),
        ("x = 5", Fraction(5)),
        ("5x", None),  # a product, not a number with a unit
        ("1e3", None),
        ("5^2", None),
        ("1,23", None),  # not a thousands grouping
        ("(1,2)", None),
        ("1/0", None),
        (r"\sqrt{2}", None),
        ("abc", None),
        ("", None),
    ],
)
def test_parse_number_lenient(text: str, expected: Fraction | None) -> None:
    value = parse_number(text)
    assert (None if value is None else Fraction(value)) == expected


@pytest.mark.parametrize("text", ["12 apples", "5 cm^2", "50%", r"10\%", "x = 5"])
def test_parse_number_strict_refuses_decorations(text: str) -> None:
    assert parse_number(text) is not None
    assert parse_number(text, lenient=False) is None


def test_parse_number_types() -> None:
    assert isinstance(parse_number("2.5"), Decimal)
    assert isinstance(parse_number(r"\frac{5}{2}"), Fraction)


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("0.5", "1/2", True),
        ("0.5", r"\frac{1}{2}", True),
        ("1/2", r"\frac{1}{2}", True),
        ("5", "5.00", True),
        ("$1,234", "1234", True),
        ("-3", r"-\frac{6}{2}", True),
        ("0.333", "1/3", False),  # exact, not approximate
        ("5", "-5", False),
        ("5", "six", False),
        ("six", "six", False),  # not numbers at all
    ],
)
def test_numbers_equal(a: str, b: str, equal: bool) -> None:
    assert numbers_equal(a, b) is equal
    assert numbers_equal(b, a) is equal


def test_numbers_equal_accepts_parsed_values() -> None:
    assert numbers_equal(Decimal("0.25"), Fraction(1, 4))
    assert not numbers_equal(Decimal("0.25"), "1/3")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("5.00"), "5"),
        (Decimal("0.50"), "0.5"),
        (Decimal("-2.5"), "-2.5"),
        (Fraction(1, 3), "1/3"),
        (Fraction(3, 8), "0.375"),
        (Decimal("1234"), "1234"),
    ],
)
def test_format_number(value: Decimal | Fraction, text: str) -> None:
    assert format_number(value) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"Reasoning... \boxed{\$1,234.00}", "1234"),
        (r"\boxed{18 dollars}", "18"),
        (r"\boxed{3+5 = 8}", "8"),  # an equation in the box: its last number
        (r"I got 7 first, but the answer is \boxed{9}. Check: 9 - 2 = 7", "9"),  # the box beats later numbers
        ("So she makes 18 dollars every day.", "18"),
        ("3+4*5 = 3+20 = 23", "23"),
        ("The answer is -12.", "-12"),
        (r"\boxed{none}", "none"),  # readable, so it may vote, but it is not a number
        ("I cannot tell.", None),
    ],
)
def test_extract_numeric_answer(text: str, expected: str | None) -> None:
    assert extract_numeric_answer(text) == expected


def test_numeric_equivalent() -> None:
    assert numeric_equivalent("1234", "$1,234")
    assert numeric_equivalent("none", "None")  # non-numbers agree with themselves, for voting
    assert not numeric_equivalent("5", "none")
    assert not numeric_equivalent("5", "6")


def test_normalize_text_ignores_spelling_only() -> None:
    assert normalize_text(r"\left( 1, 2 \right)") == normalize_text("(1,2)")
    assert normalize_text(r"\dfrac{1}{2}") == normalize_text(r"\frac{1}{2}")
    assert normalize_text("(1,2)") != normalize_text("(2,1)")
    assert normalize_text("A") != normalize_text("a")
