"""Reading final answers out of model text, and comparing numbers exactly.

Pure functions with no task knowledge, so every task grades the same way and the hard cases (commas, `$`,
units, LaTeX fractions, nested braces) are tested once. Numbers are compared as exact rationals: a float
tolerance would let "0.333" vote with "1/3", which is a different answer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

Number = Decimal | Fraction

# `\boxed` or `\fbox`, but not a longer command such as `\boxedsymbol`.
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BOX_TOKEN = re.compile(r"[^\s$}]+")

# An integer part: either correctly grouped thousands ("1,234,567") or plain digits. The lookahead stops
# "1,2345" from reading as 1,234 followed by a stray 5.
_INT = r"(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)"
_DEC = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_LATEX_FRAC = r"\\[dt]?frac\s*\{\s*(?P<fn>[-+]?\d+)\s*\}\s*\{\s*(?P<fd>[-+]?\d+)\s*\}"
_LATEX_FRAC_SHORT = r"\\[dt]?frac(?P<sn>\d)(?P<sd>\d)"  # \frac12
_PLAIN = rf"(?P<p>{_DEC})(?:\s*/\s*(?P<q>{_INT}))?"
_FULL_NUMBER = re.compile(
    rf"(?P<sign>[-+]?)\s*(?:{_LATEX_FRAC}|{_LATEX_FRAC_SHORT}|{_PLAIN})(?P<rest>.*)", re.DOTALL
)

# A number in running text. A minus is a sign only when it does not follow something it could be
# subtracting from ("5-3" ends in 3, not -3); a number glued to a word, an exponent or a decimal point
# ("x_2", "cm^2", "3.14.15") is not an answer.
_TEXT_NUMBER = re.compile(
    rf"(?P<sign>(?<![\w)\]}}])-)?(?<![\w^.])(?:{_LATEX_FRAC}|(?P<p>{_DEC})(?:/(?P<q>\d+))?)"
)

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
# Units or words after a space ("12 apples", "5 cm^2"); not "5x" (a product) nor "1e3" (an exponent).
_TRAILING_WORDS = re.compile(r"\s+[A-Za-z]")
_ASSIGNMENT = re.compile(r"^(?:[A-Za-z]\w*\s*)?=\s*")


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`).

    The last box wins because models restate and revise; an unclosed or empty last box gives None rather
    than an earlier box, since the final answer is the one that could not be read.
    """
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    return _box_content(text, matches[-1].end())


def _box_content(text: str, start: int) -> str | None:
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # `\boxed 5`: TeX takes the next token as the argument. Only valid after a space.
        if i == start:
            return None
        token = _BOX_TOKEN.match(text, i)
        if token is None:
            return None
        value = token.group().rstrip(".,;")
        return value or None
    depth = 0
    j = i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2  # an escaped brace `\{` does not open or close anything
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1 : j].strip()
                return content or None
        j += 1
    return None


def last_number(text: str) -> str | None:
    """The last number written in `text`, with thousands commas removed ("1,234.5" -> "1234.5").

    Also reads "3/4" and `\\frac{3}{4}` as one number, so a fraction answer does not come back as its
    denominator.
    """
    text = text.replace("\u2212", "-")
    matches = list(_TEXT_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    sign = "-" if last.group("sign") else ""
    if last.group("fn") is not None:
        return f"{sign}{last.group('fn')}/{last.group('fd')}"
    body = last.group("p").replace(",", "")
    if last.group("q") is not None:
        body = f"{body}/{last.group('q')}"
    return sign + body


def parse_number(s: str, *, lenient: bool = True) -> Number | None:
    """The exact value of an answer string that is a single number, else None.

    `lenient` (word problems) also accepts what people write around a number: "12 apples", "5 cm^2",
    "50%", "x = 5" (units must follow a space, so "5x" is not 5). MATH grading passes `lenient=False`
    so that "5 cm" or "10\\%" go to the symbolic grader instead of being misread as a plain number.
    """
    t = _clean(s)
    if lenient:
        t = t.replace("\\%", "").replace("%", "")
        t = _ASSIGNMENT.sub("", t).strip()
    t = t.rstrip(".").strip()
    m = _FULL_NUMBER.fullmatch(t)
    if m is None:
        return None
    rest = m.group("rest")
    if rest and not (lenient and _TRAILING_WORDS.match(rest)):
        return None
    value = _match_value(m)
    if value is not None and m.group("sign") == "-":
        value = -value
    return value


def _clean(s: str) -> str:
    t = s.strip().replace("\u2212", "-")
    for spacing in ("\\!", "\\,", "\\;"):
        t = t.replace(spacing, "")
    t = t.replace("\\ ", " ")
    t = t.replace("{,}", ",")
    prev = None
    while prev != t:  # unwrap nested \text{\textbf{5}}
        prev = t
        t = _TEXT_WRAPPER.sub(r"\1", t)
    t = t.replace("\\$", "").replace("$", "")
    t = _DEGREES.sub("", t)
    return t.strip()


def _match_value(m: re.Match[str]) -> Number | None:
    if m.group("fn") is not None:
        num, den = m.group("fn"), m.group("fd")
    elif m.group("sn") is not None:
        num, den = m.group("sn"), m.group("sd")
    else:
        p = m.group("p").replace(",", "")
        q = m.group("q")
        if q is None:
            try:
                return Decimal(p)
            except InvalidOperation:
                return None
        try:
            return Fraction(Decimal(p)) / Fraction(int(q.replace(",", "")))
        except ZeroDivisionError:
            return None
    if int(den) == 0:
        return None
    return Fraction(int(num), int(den))


def numbers_equal(a: str | Number, b: str | Number) -> bool:
    """Exact numeric equality (0.5 == 1/2 == \\frac{1}{2}; 5 == 5.00). False when either is not a number."""
    x = parse_number(a) if isinstance(a, str) else a
    y = parse_number(b) if isinstance(b, str) else b
    if x is None or y is None:
        return False
    return Fraction(x) == Fraction(y)


def format_number(x: Number) -> str:
    """One spelling per value ("5.00" -> "5", "0.50" -> "0.5", 1/3 -> "1/3"), so stored answers compare
    and display the same whichever way the model wrote them."""
    f = Fraction(x)
    if f.denominator == 1:
        return str(f.numerator)
    den = f.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{f.numerator}/{f.denominator}"
    text = format(Decimal(f.numerator) / Decimal(f.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def normalize_text(s: str) -> str:
    """A spelling-insensitive key for answers that are not numbers: spaces, `$` and LaTeX sizing commands
    do not change what an answer says. Case is kept: in MATH, `A` and `a` can be different answers."""
    t = _clean(s)
    t = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", t)
    t = re.sub(r"\\[dt]frac", r"\\frac", t)
    return re.sub(r"\s+", "", t).rstrip(".")


def extract_numeric_answer(text: str) -> str | None:
    """The answer of a word problem: the last box if any, else the last number in the text.

    A boxed number is returned in canonical form; a box with an expression ("3+5=8") gives its last
    number; a box with no number at all ("none") is returned as written so it can still vote.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        value = parse_number(boxed)
        if value is not None:
            return format_number(value)
        inner = last_number(boxed)
        if inner is not None:
            inner_value = parse_number(inner)
            return format_number(inner_value) if inner_value is not None else inner
        return boxed
    found = last_number(text)
    if found is None:
        return None
    value = parse_number(found)
    return format_number(value) if value is not None else found


def numeric_equivalent(a: str, b: str) -> bool:
    """Word-problem grading: exact numbers when both are numbers; otherwise the same text, so that a
    non-numeric answer still agrees with itself when voting."""
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return Fraction(x) == Fraction(y)
    if x is not None or y is not None:
        return False
    return normalize_text(a).lower() == normalize_text(b).lower()
