"""Per-record switch conditions: the small, safe expression language of a stage's ``when``.

A condition is read by a hand-written parser (no ``eval``, nothing of Python's is
reachable) into a tree of frozen nodes, checked against the tensors it names when a
pipeline is defined, and evaluated per record, column-wise with NumPy, in the gateway.

Grammar (keywords are lower case)::

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := operand (("==" | "!=" | "<" | "<=" | ">" | ">=") operand)?
    operand := NUMBER | STRING | "true" | "false" | ref ("[" INTEGER "]")* | "(" expr ")"
    ref     := NAME ("." NAME)?        # "<stage-id>.<output>", or a request field

Examples: ``scale.features[0] > 0.5``, ``lr.label == 'setosa'``,
``not (tree.probabilities[2] >= 0.9 or lr.label != "virginica")``.

Each reference, after its indexes, must be one value per record (a tensor of shape
``[-1]``, or ``[-1, k]`` indexed once). Strings compare with ``BYTES`` tensors by
``==``/``!=`` only; numbers with numeric tensors by any comparison; a ``BOOL`` value
may stand alone. Anything else is a ``ConditionError`` naming what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from sluice.tensors import TensorSpec

MAX_LENGTH = 1000
MAX_DEPTH = 32


class ConditionError(ValueError):
    """A condition that cannot be parsed or does not fit the tensors it names."""


@dataclass(frozen=True, slots=True)
class Ref:
    """A tensor: ``stage`` is the producing stage's id, "" for a request field."""

    stage: str
    tensor: str
    indexes: tuple[int, ...] = ()

    def __str__(self) -> str:
        head = f"{self.stage}.{self.tensor}" if self.stage else self.tensor
        return head + "".join(f"[{i}]" for i in self.indexes)


@dataclass(frozen=True, slots=True)
class Literal:
    value: float | int | str | bool


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: "Node"
    right: "Node"


@dataclass(frozen=True, slots=True)
class BoolOp:
    op: str  # "and" | "or"
    items: tuple["Node", ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: "Node"


Node = Ref | Literal | Compare | BoolOp | Not

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<name>[A-Za-z0-9_][A-Za-z0-9_-]*\.[A-Za-z_][A-Za-z0-9_-]*|[A-Za-z_][A-Za-z0-9_-]*)
      | (?P<number>\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)
      | (?P<string>'[^'\\]*'|"[^"\\]*")
      | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|-)
    )""",
    re.VERBOSE,
)
_COMPARISONS = {"==", "!=", "<", "<=", ">", ">="}
_KEYWORDS = {"and", "or", "not", "true", "false"}


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            at = len(text) - len(text[pos:].lstrip())
            raise ConditionError(f"unexpected {text[at]!r} at position {at}")
        kind = match.lastgroup
        value = match.group(kind)
        out.append((kind, value, match.start(kind)))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokens(text)
        self.pos = 0
        self.depth = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise ConditionError("the condition ends too early")
        self.pos += 1
        return token

    def expect(self, value: str) -> None:
        kind, got, at = self.take()
        if got != value:
            raise ConditionError(f"expected {value!r} at position {at}, got {got!r}")

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token and token[0] == "name" and token[1] == word:
            self.pos += 1
            return True
        return False

    def parse(self) -> Node:
        node = self.expr()
        token = self.peek()
        if token is not None:
            raise ConditionError(f"unexpected {token[1]!r} at position {token[2]}")
        return node

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConditionError(f"the condition nests deeper than {MAX_DEPTH}")
        try:
            return self.bool_op("or", lambda: self.bool_op("and", self.negation))
        finally:
            self.depth -= 1

    def bool_op(self, word: str, item: Callable[[], Node]) -> Node:
        items = [item()]
        while self.keyword(word):
            items.append(item())
        return items[0] if len(items) == 1 else BoolOp(word, tuple(items))

    def negation(self) -> Node:
        if self.keyword("not"):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ConditionError(f"the condition nests deeper than {MAX_DEPTH}")
            try:
                return Not(self.negation())
            finally:
                self.depth -= 1
        return self.compare()

    def compare(self) -> Node:
        left = self.operand()
        token = self.peek()
        if token and token[0] == "op" and token[1] in _COMPARISONS:
            self.pos += 1
            right = self.operand()
            following = self.peek()
            if following and following[0] == "op" and following[1] in _COMPARISONS:
                raise ConditionError(f"comparisons do not chain: put 'and' between them (position {following[2]})")
            return Compare(token[1], left, right)
        return left

    def operand(self) -> Node:
        kind, value, at = self.take()
        if kind == "op" and value == "(":
            node = self.expr()
            self.expect(")")
            return node
        if kind == "op" and value == "-":
            kind, value, at = self.take()
            if kind != "number":
                raise ConditionError(f"'-' must precede a number (position {at})")
            return Literal(-_number(value))
        if kind == "number":
            return Literal(_number(value))
        if kind == "string":
            return Literal(value[1:-1])
        if kind == "name":
            if value in ("true", "false"):
                return Literal(value == "true")
            if value in _KEYWORDS:
                raise ConditionError(f"unexpected {value!r} at position {at}")
            stage, _, tensor = value.rpartition(".")
            indexes: list[int] = []
            while (token := self.peek()) and token[1] == "[":
                self.pos += 1
                negative = self.peek() is not None and self.peek()[1] == "-"
                if negative:
                    self.pos += 1
                kind, number, at = self.take()
                if kind != "number" or not number.isdigit():
                    raise ConditionError(f"an index must be an integer (position {at})")
                indexes.append(-int(number) if negative else int(number))
                self.expect("]")
            return Ref(stage, tensor, tuple(indexes))
        raise ConditionError(f"unexpected {value!r} at position {at}")


def _number(text: str) -> float | int:
    return int(text) if text.isdigit() else float(text)


def parse(text: str) -> Node:
    """The condition's tree, or ConditionError saying where it went wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionError("the condition is empty")
    if len(text) > MAX_LENGTH:
        raise ConditionError(f"the condition is longer than {MAX_LENGTH} characters")
    return _Parser(text).parse()


def refs(node: Node) -> list[Ref]:
    """Every tensor the condition reads, in order."""
    if isinstance(node, Ref):
        return [node]
    if isinstance(node, Compare):
        return refs(node.left) + refs(node.right)
    if isinstance(node, BoolOp):
        return [r for item in node.items for r in refs(item)]
    if isinstance(node, Not):
        return refs(node.item)
    return []


# --- checking against signatures -------------------------------------------------

_NUMERIC = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}


def _kind_of_ref(ref: Ref, spec: TensorSpec) -> str:
    """"number", "string" or "bool": what one record's value of ``ref`` is."""
    per_record = list(spec.shape[1:])
    if len(ref.indexes) != len(per_record):
        raise ConditionError(
            f"{ref} is not one value per record: {ref.stage + '.' if ref.stage else ''}{ref.tensor} has shape "
            f"{list(spec.shape)}, so it takes {len(per_record)} index(es), got {len(ref.indexes)}"
        )
    for index, size in zip(ref.indexes, per_record):
        if size != -1 and not -size <= index < size:
            raise ConditionError(f"{ref}: index {index} is out of range for shape {list(spec.shape)}")
    if spec.datatype == "BYTES":
        return "string"
    if spec.datatype == "BOOL":
        return "bool"
    return "number"


def check(node: Node, lookup: Callable[[Ref], TensorSpec]) -> None:
    """ConditionError unless ``node`` is a well-typed per-record boolean;
    ``lookup`` gives a reference's tensor (or raises ConditionError naming it)."""
    if _kind(node, lookup) != "bool":
        raise ConditionError("the condition must be true or false per record: compare the value (e.g. x > 0.5)")


def _kind(node: Node, lookup: Callable[[Ref], TensorSpec]) -> str:
    if isinstance(node, Ref):
        return _kind_of_ref(node, lookup(node))
    if isinstance(node, Literal):
        if isinstance(node.value, bool):
            return "bool"
        return "string" if isinstance(node.value, str) else "number"
    if isinstance(node, Compare):
        left, right = _kind(node.left, lookup), _kind(node.right, lookup)
        if left != right and {left, right} != {"bool", "number"}:
            raise ConditionError(f"cannot compare a {left} with a {right} ({_show(node.left)} {node.op} {_show(node.right)})")
        if left == "string" and node.op not in ("==", "!="):
            raise ConditionError(f"strings compare only with == or != ({_show(node.left)} {node.op} {_show(node.right)})")
        return "bool"
    items = node.items if isinstance(node, BoolOp) else (node.item,)
    for item in items:
        if _kind(item, lookup) != "bool":
            raise ConditionError(f"{_show(item)} is not true or false: compare it (e.g. {_show(item)} > 0)")
    return "bool"


def _show(node: Node) -> str:
    if isinstance(node, Literal):
        return repr(node.value)
    return str(node) if isinstance(node, Ref) else type(node).__name__.lower()


# --- evaluation ------------------------------------------------------------------

_OPS = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


def evaluate(node: Node, values: Mapping[Ref, np.ndarray], rows: int) -> np.ndarray:
    """The condition for each of ``rows`` records, as a boolean array; ``values`` holds,
    for each reference (as ``refs`` lists them), its tensor over those records."""
    result = _evaluate(node, values, rows)
    return np.broadcast_to(np.asarray(result, dtype=bool), (rows,))


def _evaluate(node: Node, values: Mapping[Ref, np.ndarray], rows: int):
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Ref):
        array = values[node]
        if node.indexes:
            array = array[(slice(None), *node.indexes)]
        if array.dtype == object:  # BYTES: compared as text
            return np.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array], dtype=object)
        return array
    if isinstance(node, Compare):
        left, right = _evaluate(node.left, values, rows), _evaluate(node.right, values, rows)
        return np.asarray(_OPS[node.op](left, right), dtype=bool)
    if isinstance(node, Not):
        return np.logical_not(_evaluate(node.item, values, rows))
    parts = [np.broadcast_to(np.asarray(_evaluate(i, values, rows), dtype=bool), (rows,)) for i in node.items]
    combine = np.logical_and if node.op == "and" else np.logical_or
    return combine.reduce(parts)
