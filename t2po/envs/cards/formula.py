"""Arithmetic formulas of the points games: a safe evaluator and a solver.

Model text is never passed to `eval`. A formula is tokenized into numbers, `+ - * /` and parentheses
and evaluated by a recursive-descent parser over the grammar

    expression := term (('+' | '-') term)*
    term       := factor (('*' | '/') factor)*
    factor     := NUMBER | '(' expression ')'

with exact rational arithmetic (`fractions.Fraction`), so that `8 / (3 - 8 / 3)` is exactly 24 (the
gym-cards games used Python's float `eval`). There is deliberately no unary minus, no power and no
implicit concatenation: adjacent numbers are a syntax error (gym-cards' string `eval` read the
tokens `2`, `4` as 24). Input length and nesting depth are bounded, so hostile input costs at most
a few hundred steps.

The solver finds, for a multiset of card numbers and a formula prefix, a complete formula that
starts with that prefix, uses every number exactly once and reaches the target (the expert of the
EZPoints and Points24 games).
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from fractions import Fraction
from typing import Sequence

#: binary operators the evaluator knows
OPERATORS = ("+", "-", "*", "/")
#: longest formula text accepted (the games' formulas are at most 20 tokens)
MAX_FORMULA_CHARS = 200
#: deepest parenthesis nesting accepted
MAX_NESTING = 32


class FormulaError(ValueError):
    """A formula that cannot be evaluated: bad character, syntax error, division by zero, too long."""


def tokenize(text: str) -> list[str]:
    """Split formula text into tokens (numbers, operators, parentheses); whitespace is ignored."""
    if not isinstance(text, str):
        raise FormulaError(f"a formula must be a string, got {type(text).__name__}")
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(f"formula is {len(text)} characters long; at most {MAX_FORMULA_CHARS} are accepted")
    tokens: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "0123456789":
            start = i
            while i < len(text) and text[i] in "0123456789":
                i += 1
            tokens.append(text[start:i])
        elif ch in "+-*/()":
            tokens.append(ch)
            i += 1
        else:
            raise FormulaError(
                f"unexpected character {ch!r} at position {i}; a formula may only contain numbers, + - * / and "
                "parentheses"
            )
    return tokens


def _is_number(token: str) -> bool:
    # str.isdigit accepts non-ASCII digits such as '²'; only ASCII digits are numbers here
    return bool(token) and all(c in "0123456789" for c in token)


def evaluate_formula(formula: str | Sequence[str]) -> Fraction:
    """Exact value of a formula given as text or as a token list. Raises `FormulaError`."""
    tokens = tokenize(formula) if isinstance(formula, str) else list(formula)
    for token in tokens:
        if not isinstance(token, str) or not (_is_number(token) or token in OPERATORS or token in "()"):
            raise FormulaError(f"unknown token {token!r}; tokens are numbers, + - * / and parentheses")
    if sum(len(t) for t in tokens) > MAX_FORMULA_CHARS:
        raise FormulaError(f"formula is longer than {MAX_FORMULA_CHARS} characters")
    if not tokens:
        raise FormulaError("the formula is empty")
    parser = _Parser(tokens)
    value = parser.expression(depth=0)
    if parser.pos != len(tokens):
        raise FormulaError(f"unexpected {tokens[parser.pos]!r} at token {parser.pos + 1}")
    return value


class _Parser:
    """Recursive descent over a token list (grammar in the module docstring)."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expression(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.factor(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise FormulaError("division by zero")
            else:
                value = value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        token = self._peek()
        if token is None:
            raise FormulaError("the formula ends where a number or '(' is expected")
        if _is_number(token):
            self.pos += 1
            return Fraction(int(token))
        if token == "(":
            if depth >= MAX_NESTING:
                raise FormulaError(f"parentheses nested deeper than {MAX_NESTING}")
            self.pos += 1
            value = self.expression(depth + 1)
            if self._peek() != ")":
                raise FormulaError(f"missing ')' at token {self.pos + 1}")
            self.pos += 1
            return value
        raise FormulaError(f"unexpected {token!r} at token {self.pos + 1}; expected a number or '('")


@functools.lru_cache(maxsize=65536)
def can_reach(numbers: tuple[Fraction, ...], target: Fraction, operators: tuple[str, ...]) -> bool:
    """Whether some expression tree over all `numbers` (each once) with `operators` equals `target`.

    The classic 24-game search: combine any two numbers into one, recurse. With parentheses allowed
    this is exactly "some formula exists"; without them it can only over-approximate (it is used as
    a quick reject before the exact prefix search). `numbers` must be sorted (the cache key).
    """
    if len(numbers) == 1:
        return numbers[0] == target
    for i, j in itertools.combinations(range(len(numbers)), 2):
        a, b = numbers[i], numbers[j]
        rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
        results = set()
        if "+" in operators:
            results.add(a + b)
        if "*" in operators:
            results.add(a * b)
        if "-" in operators:
            results.update((a - b, b - a))
        if "/" in operators:
            results.update(x / y for x, y in ((a, b), (b, a)) if y != 0)
        for r in results:
            if can_reach(tuple(sorted(rest + [r])), target, operators):
                return True
    return False


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3  # precedence of a number or a parenthesised group

# An expression tree: a card number, or (operator, left tree, right tree).
_Tree = int | tuple[str, "_Tree", "_Tree"]


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


def _render(tree: _Tree) -> tuple[tuple[str, ...], int, bool]:
    """Tokens of `tree` with the fewest parentheses, its top-level precedence, and whether it needed any."""
    if isinstance(tree, int):
        return (str(tree),), _ATOM, False
    op, left, right = tree
    (a_tokens, a_prec, a_paren), (b_tokens, b_prec, b_paren) = _render(left), _render(right)
    prec = _PRECEDENCE[op]
    left_paren = a_prec < prec
    # a - (b + c) and a / (b * c) keep their parentheses; a + (b - c) and a * (b / c) do not need them
    right_paren = b_prec < prec or (b_prec == prec and op in "-/")
    if left_paren:
        a_tokens = ("(", *a_tokens, ")")
    if right_paren:
        b_tokens = ("(", *b_tokens, ")")
    return (*a_tokens, op, *b_tokens), prec, a_paren or b_paren or left_paren or right_paren


@functools.lru_cache(maxsize=4096)
def _solutions(numbers: tuple[int, ...], target: int, operators: tuple[str, ...],
               parentheses: bool) -> tuple[tuple[str, ...], ...]:
    """Every expression tree over `numbers` that reaches `target`, written with the fewest parentheses,
    shortest first (ties in token order). Trees that need parentheses are left out when they are not
    allowed. `numbers` must be sorted (the cache key)."""
    found: set[tuple[str, ...]] = set()
    goal = Fraction(target)

    def combine(items: list[tuple[Fraction, _Tree]]) -> None:
        if len(items) == 1:
            tokens, _, needs_parentheses = _render(items[0][1])
            if parentheses or not needs_parentheses:
                found.add(tokens)
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, a_tree), (b, b_tree) = items[i], items[j]
            rest = [item for k, item in enumerate(items) if k not in (i, j)]
            for op in operators:
                # one order of a commutative pair is enough; never divide by zero
                if (op in "+*" and i > j) or (op == "/" and b == 0):
                    continue
                value = _apply(op, a, b)
                merged = rest + [(value, (op, a_tree, b_tree))]
                if can_reach(tuple(sorted(v for v, _ in merged)), goal, operators):
                    combine(merged)

    combine([(Fraction(n), n) for n in numbers])
    return tuple(sorted(found, key=lambda tokens: (len(tokens), tokens)))


@functools.lru_cache(maxsize=4096)
def complete_formula(
    numbers: tuple[int, ...],
    prefix: tuple[str, ...],
    target: int,
    operators: tuple[str, ...],
    parentheses: bool,
    max_tokens: int,
) -> tuple[str, ...] | None:
    """A complete formula (token tuple, without '=') that starts with `prefix`, uses each of `numbers`
    exactly once, has at most `max_tokens` tokens and evaluates to `target`; None if there is none.

    First the solutions written with the fewest parentheses are matched against the prefix (this
    covers every prefix the expert itself produced). A prefix written another way (extra parentheses,
    a different order) gets a depth-first search over the tokens after it, numbers before
    parentheses; groups the search opens must contain an operator at their own level (no `(3)` or
    `((a+b))`), which keeps it finite.
    """
    numbers = tuple(sorted(numbers))
    if not can_reach(tuple(Fraction(n) for n in numbers), Fraction(target), operators):
        return None
    for solution in _solutions(numbers, target, operators, parentheses):
        if len(solution) <= max_tokens and solution[: len(prefix)] == prefix:
            return solution
    return _search_completion(numbers, prefix, Fraction(target), operators, parentheses, max_tokens)


def _search_completion(
    numbers: tuple[int, ...],
    prefix: tuple[str, ...],
    target: Fraction,
    operators: tuple[str, ...],
    parentheses: bool,
    max_tokens: int,
) -> tuple[str, ...] | None:
    """The depth-first search of `complete_formula`."""
    remaining = Counter(numbers)
    # Parse state of the prefix: expect_operand, and one [has_operator, opened_in_prefix] per open group
    # (index 0 is the top level, which is never closed).
    levels: list[list[bool]] = [[False, True]]
    expect_operand = True
    for token in prefix:
        if _is_number(token):
            if not expect_operand or remaining[int(token)] == 0:
                return None
            remaining[int(token)] -= 1
            expect_operand = False
        elif token == "(":
            if not expect_operand or not parentheses:
                return None
            levels.append([False, True])
        elif token == ")":
            if expect_operand or len(levels) == 1:
                return None
            levels.pop()
        elif token in operators:
            if expect_operand:
                return None
            levels[-1][0] = True
            expect_operand = True
        else:
            return None
    tokens = list(prefix)

    def close_group() -> tuple[str, ...] | None:
        closed = levels.pop()
        tokens.append(")")
        found = search(False)
        tokens.pop()
        levels.append(closed)
        return found

    def search(expect_operand: bool) -> tuple[str, ...] | None:
        left = sum(remaining.values())
        open_groups = len(levels) - 1
        if expect_operand:
            if left == 0:
                return None
            needed = 2 * left - 1 + open_groups
        else:
            needed = 2 * left + open_groups
        if len(tokens) + needed > max_tokens:
            return None
        if expect_operand:
            for n in sorted(remaining):
                if remaining[n] == 0:
                    continue
                remaining[n] -= 1
                tokens.append(str(n))
                found = search(False)
                tokens.pop()
                remaining[n] += 1
                if found:
                    return found
            if parentheses and left >= 2:
                levels.append([False, False])
                tokens.append("(")
                found = search(True)
                tokens.pop()
                levels.pop()
                if found:
                    return found
            return None
        if left == 0 and open_groups == 0:
            try:
                if evaluate_formula(tokens) == target:
                    return tuple(tokens)
            except FormulaError:
                pass
            return None
        # Close a group that has an operator first (the natural reading); a group the prefix opened
        # around a lone number, as in '(3', is closed only after trying to extend it.
        if open_groups and levels[-1][0]:
            found = close_group()
            if found:
                return found
        if left:
            had_operator = levels[-1][0]
            levels[-1][0] = True
            for op in operators:
                tokens.append(op)
                found = search(True)
                tokens.pop()
                if found:
                    levels[-1][0] = had_operator
                    return found
            levels[-1][0] = had_operator
        if open_groups and not levels[-1][0] and levels[-1][1]:
            return close_group()
        return None

    return search(expect_operand)
