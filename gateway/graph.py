"""The per-record bookkeeping of a graph pipeline's run, for ``gateway.executor``.

Each stage that ran leaves a ``Part``: the records it ran on (``rows``, indexes into
the request's batch, in order; ``None``: every record) and its outputs over exactly
those records. A stage runs where every stage it reads ran, narrowed by its switch
(``switch_rows``): the first sibling, in definition order, whose condition holds
takes a record; a ``default`` sibling takes what none took. Its inputs are its
sources' tensors cut to its records (``inputs_for``): raw bytes passed through
untouched when the records are the same, decoded, indexed and re-encoded only when a
switch split the batch. The answer (``answer``) puts every field back in the
request's record order; a record whose field no stage gave holds zeros there and is
listed in ``Answer.absent`` (the records API leaves the field out of that record).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.pipelines import CompiledPipeline, CompiledStage
from sluice import conditions
from sluice.plan import REQUEST
from sluice.tensors import DATATYPE_TO_DTYPE, from_raw, to_raw

RawTensor = tuple[str, list[int], bytes]  # (datatype, shape, raw bytes)
Rows = np.ndarray | None  # record indexes, ascending; None: every record


@dataclass(slots=True)
class Part:
    """What one stage (or the request, ``REQUEST``) gave: its records and its tensors over them."""

    rows: Rows
    tensors: dict[str, RawTensor]

    @property
    def empty(self) -> bool:
        return self.rows is not None and len(self.rows) == 0


class Answer(dict):
    """The answer's fields (name -> raw tensor over every record), and per field the
    records no stage gave it to (``absent``; they hold zeros in the tensor)."""

    def __init__(self, tensors: dict[str, RawTensor], absent: dict[str, np.ndarray] | None = None):
        super().__init__(tensors)
        self.absent: dict[str, np.ndarray] = absent or {}


def batch_size(inputs: dict[str, RawTensor]) -> int:
    first = next(iter(inputs.values()), None)
    return first[1][0] if first is not None and first[1] else 1


def _intersect(a: Rows, b: Rows) -> Rows:
    if a is None:
        return b
    if b is None:
        return a
    return np.intersect1d(a, b, assume_unique=True)


def candidate_rows(stage: CompiledStage, parts: dict[str, Part]) -> Rows:
    """The records on which every stage ``stage`` reads ran."""
    rows: Rows = None
    for stage_id in stage.reads:
        rows = _intersect(rows, parts[stage_id].rows)
    return rows


def _array(part: Part, name: str) -> np.ndarray:
    datatype, shape, raw = part.tensors[name]
    return from_raw(raw, datatype, shape)


def _cut(part: Part, rows: Rows, n: int) -> np.ndarray | None:
    """Positions within ``part``'s tensors of ``rows`` (None: all of them, unchanged)."""
    if rows is None:  # every record: so the part holds every record too
        return None
    if len(rows) == (n if part.rows is None else len(part.rows)):
        return None  # rows is a subset of the part's records: equal length means equal
    return rows if part.rows is None else np.searchsorted(part.rows, rows)


def inputs_for(stage: CompiledStage, parts: dict[str, Part], rows: Rows, n: int) -> dict[str, RawTensor]:
    """The stage's inputs (by input name) over ``rows``."""
    out: dict[str, RawTensor] = {}
    for spec, stage_id, source in zip(stage.inputs, stage.source_stages, stage.sources):
        part = parts[stage_id]
        if source not in part.tensors:
            raise KeyError(source)
        positions = _cut(part, rows, n)
        if positions is None:
            out[spec.name] = part.tensors[source]
            continue
        array = _array(part, source)[positions]
        datatype, raw = to_raw(array, part.tensors[source][0])
        out[spec.name] = (datatype, list(array.shape), raw)
    return out


def switch_rows(pipeline: CompiledPipeline, stage: CompiledStage, parts: dict[str, Part], n: int,
                cache: dict[tuple[str, ...], dict[str, np.ndarray]]) -> np.ndarray:
    """The records ``stage`` takes in its switch (computed once per switch and request)."""
    taken = cache.get(stage.siblings)
    if taken is None:
        by_id = {s.id: s for s in pipeline.stages}
        free = np.ones(n, dtype=bool)
        taken = {}
        for sibling_id in stage.siblings:
            sibling = by_id[sibling_id]
            if sibling.default:
                continue
            mask = np.zeros(n, dtype=bool)
            rows = candidate_rows(sibling, parts)
            all_rows = np.arange(n) if rows is None else rows
            if len(all_rows):
                mask[all_rows] = _condition(sibling, parts, rows, len(all_rows), n)
            mask &= free
            free &= ~mask
            taken[sibling_id] = np.flatnonzero(mask)
        for sibling_id in stage.siblings:
            sibling = by_id[sibling_id]
            if sibling.default:
                rows = candidate_rows(sibling, parts)
                within = np.zeros(n, dtype=bool)
                within[np.arange(n) if rows is None else rows] = True
                taken[sibling_id] = np.flatnonzero(within & free)
        cache[stage.siblings] = taken
    return taken[stage.id]


def _condition(stage: CompiledStage, parts: dict[str, Part], rows: Rows, count: int, n: int) -> np.ndarray:
    values = {}
    for ref in conditions.refs(stage.condition):
        part = parts[ref.stage or REQUEST]
        array = _array(part, ref.tensor)
        positions = _cut(part, rows, n)
        values[ref] = array if positions is None else array[positions]
    return conditions.evaluate(stage.condition, values, count)


def answer(pipeline: CompiledPipeline, parts: dict[str, Part], n: int) -> Answer:
    """Every answer field over every record, in the request's order."""
    tensors: dict[str, RawTensor] = {}
    absent: dict[str, np.ndarray] = {}
    for field in pipeline.answer:
        given = [(parts[s.stage], s.output) for s in field.sources if s.stage in parts and not parts[s.stage].empty]
        if len(given) == 1 and given[0][0].rows is None:
            tensors[field.spec.name] = given[0][0].tensors[given[0][1]]
            continue
        covered = np.zeros(n, dtype=bool)
        full: np.ndarray | None = None
        for part, output in given:
            array = _array(part, output)
            if full is None:
                dtype = DATATYPE_TO_DTYPE[field.spec.datatype]
                full = np.zeros((n, *array.shape[1:]), dtype=dtype)
                if dtype == object:
                    full.fill(b"")
            rows = np.arange(n) if part.rows is None else part.rows
            full[rows] = array
            covered[rows] = True
        if full is None:
            dims = tuple(max(d, 0) for d in field.spec.shape[1:])
            full = np.zeros((n, *dims), dtype=DATATYPE_TO_DTYPE[field.spec.datatype])
            if full.dtype == object:
                full.fill(b"")
        datatype, raw = to_raw(full, field.spec.datatype)
        tensors[field.spec.name] = (datatype, list(full.shape), raw)
        if not covered.all():
            absent[field.spec.name] = np.flatnonzero(~covered)
    return Answer(tensors, absent)
