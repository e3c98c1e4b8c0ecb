"""Resolves a graph pipeline definition (``after``, ``inputs`` from ``<stage>.<output>``,
``when``/``default``) into a graph plan (``sluice.plan``), checked when it is defined.

Rules, each refused with a 422 that names the stages and tensors:

- stage ids are unique (default: the stage's index) and everything named exists:
  ``after`` ids, ``<stage>.<output>`` inputs, the tensors a condition reads;
- a stage waits for the stages in its ``after`` (without ``after`` anywhere in the
  definition: the previous stage, as in a chain), and for those its inputs and its
  condition read; a cycle among those is refused, naming its stages;
- an input without an explicit source takes the output of the same name of the stages
  it runs after (or their only output when it has one input and they give one), or,
  on a stage that runs after none, the request field of that name; its datatype and
  shape must fit;
- a request field read by several stages has one datatype and shape;
- ``when`` parses and types (``sluice.conditions``); ``default`` takes no condition and
  needs a sibling (a stage with the same ``after``) that has one.

A stage runs, per record, only where every stage it reads ran (and its condition
holds): so the answer's fields are the outputs of the stages nothing waits for, each
record holding those of the stages that ran for it. Outputs of one name from stages
on different branches of one switch (which never both run for a record) are one
field; other collisions are prefixed ``<stage-id>.``.
"""

from __future__ import annotations

from dataclasses import replace

from manager.resolve import check_compatible, stage_plan, stage_signature
from manager.schemas import PipelineSpec, StageSpec
from manager.store import RuntimeRow
from sluice import conditions
from sluice.errors import ApiError
from sluice.plan import REQUEST, AnswerField, Binding, PipelinePlan, Source, StagePlan
from sluice.tensors import TensorSpec


def _error(code: str, index: int, stage: StageSpec, stage_id: str, why: str, **details) -> ApiError:
    return ApiError(422, f"stage {index} ({stage_id}): {why}", code, stage=index, stage_id=stage_id, **details)


def resolve_graph(spec: PipelineSpec, revision: int, runtimes: dict[str, RuntimeRow], default_timeout_ms: int) -> PipelinePlan:
    defs = list(spec.stages or [])
    ids = [s.id or str(i) for i, s in enumerate(defs)]
    position: dict[str, int] = {}
    for index, stage_id in enumerate(ids):
        if stage_id in position:
            first = position[stage_id]
            raise _error("duplicate_stage_id", index, defs[index], stage_id,
                         f"id {stage_id!r} is also stage {first}'s", stages=[first, index])
        position[stage_id] = index
    chain = all(s.after is None for s in defs)
    signatures = [stage_signature(i, s, runtimes) for i, s in enumerate(defs)]

    def known(index: int, stage_id: str, what: str) -> int:
        if stage_id not in position:
            raise _error("unknown_stage", index, defs[index], ids[index],
                         f"{what} names unknown stage {stage_id!r}; the stages are {ids}", unknown=stage_id, known=ids)
        if stage_id == ids[index]:
            raise _error("cycle", index, defs[index], ids[index], f"{what} names the stage itself", stages=[stage_id])
        return position[stage_id]

    # edges named in `after` (or the chain's previous stage)
    after: list[list[str]] = []
    for index, stage in enumerate(defs):
        named = [ids[index - 1]] if chain and index else list(stage.after or [])
        for stage_id in named:
            known(index, stage_id, "'after'")
        after.append(named)
    _check_acyclic(defs, ids, after)

    # input bindings, and the request fields they read
    request: dict[str, TensorSpec] = {}
    reader: dict[str, int] = {}
    bindings: list[tuple[Binding, ...]] = []
    for index, stage in enumerate(defs):
        inputs = signatures[index][0]
        explicit = stage.inputs or {}
        unknown = sorted(set(explicit) - {t.name for t in inputs})
        if unknown:
            raise _error("signature_mismatch", index, stage, ids[index], f"the stage has no input {unknown[0]!r}",
                         tensor=unknown[0])
        feeding = {d: signatures[position[d]][1] for d in after[index]}
        found: list[Binding] = []
        for tensor in inputs:
            binding = _bind(index, stage, ids, tensor, explicit.get(tensor.name), feeding, inputs, chain, known)
            if binding.stage == REQUEST:
                _request_field(index, stage, ids, tensor, binding.source, request, reader)
            else:
                given = next((t for t in signatures[position[binding.stage]][1] if t.name == binding.source), None)
                if given is None:
                    outputs = [t.name for t in signatures[position[binding.stage]][1]]
                    raise _error("signature_mismatch", index, stage, ids[index],
                                 f"stage {binding.stage!r} has no output {binding.source!r} (it gives {outputs}) "
                                 f"for input {tensor.name!r}", tensor=tensor.name, source=f"{binding.stage}.{binding.source}")
                try:
                    check_compatible(index, stage, tensor, given)
                except ApiError as exc:
                    why = exc.message.split(": ", 1)[-1]
                    raise _error("signature_mismatch", index, stage, ids[index],
                                 f"edge {binding.stage}.{binding.source} -> {ids[index]}.{tensor.name}: {why}",
                                 tensor=tensor.name, source=f"{binding.stage}.{binding.source}") from None
            found.append(binding)
        bindings.append(tuple(found))

    # conditions
    reads: list[list[str]] = []
    for index, stage in enumerate(defs):
        reads.append([])
        if stage.default and stage.when:
            raise _error("bad_condition", index, stage, ids[index], "a stage takes 'when' or 'default', not both")
        if not stage.when:
            continue
        try:
            node = conditions.parse(stage.when)
            conditions.check(node, lambda ref: _lookup(index, ref, ids, position, signatures, request, known))
        except conditions.ConditionError as exc:
            raise _error("bad_condition", index, stage, ids[index], f"condition {stage.when!r}: {exc}",
                         condition=stage.when) from None
        reads[index] = [r.stage for r in conditions.refs(node) if r.stage]

    waits = [_unique(after[i] + [b.stage for b in bindings[i] if b.stage] + reads[i]) for i in range(len(defs))]
    _check_acyclic(defs, ids, waits)
    for index, stage in enumerate(defs):
        if stage.default and not any(
            defs[j].when and set(waits[j]) == set(waits[index]) for j in range(len(defs)) if j != index
        ):
            raise _error("bad_condition", index, stage, ids[index],
                         "a 'default' stage takes the records its siblings' conditions did not: "
                         "no stage with the same 'after' has a 'when'")

    stages = tuple(
        stage_plan(spec, revision, index, stage, runtimes, default_timeout_ms, *signatures[index], bindings[index],
                   id=ids[index], after=tuple(waits[index]), when=stage.when or "", default=stage.default)
        for index, stage in enumerate(defs)
    )
    rate_limit = spec.rate_limit.plan() if spec.rate_limit is not None else None
    plan = PipelinePlan(spec.name, revision, spec.transportType, stages, rate_limit=rate_limit,
                        request=tuple(request.values()))
    return replace(plan, answer=answer_fields(plan))


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _bind(index, stage, ids, tensor, explicit, feeding, inputs, chain, known) -> Binding:
    name = tensor.name
    if explicit is not None:
        head, dot, output = explicit.partition(".")
        if dot and (head in ids or head.isdigit() or not chain):
            known(index, head, f"input {name!r}")
            return Binding(name, output, head)
        if chain and index:  # a chain's bare source: the previous stage's output
            return Binding(name, explicit, ids[index - 1])
        return Binding(name, explicit, REQUEST)
    holders = [d for d, outputs in feeding.items() if any(t.name == name for t in outputs)]
    if len(holders) > 1:
        raise _error("ambiguous_input", index, stage, ids[index],
                     f"input {name!r} is an output of {holders}: name one in 'inputs' (e.g. \"{holders[0]}.{name}\")",
                     tensor=name, stages=holders)
    if holders:
        return Binding(name, name, holders[0])
    all_outputs = [(d, t) for d, outputs in feeding.items() for t in outputs]
    if len(inputs) == 1 and len(all_outputs) == 1:
        return Binding(name, all_outputs[0][1].name, all_outputs[0][0])
    if not feeding:
        return Binding(name, name, REQUEST)
    given = {d: [t.name for t in outputs] for d, outputs in feeding.items()}
    raise _error("signature_mismatch", index, stage, ids[index],
                 f"no stage it runs after gives input {name!r} (they give {given}); name its source in 'inputs'",
                 tensor=name)


def _request_field(index, stage, ids, tensor, field, request, reader) -> None:
    wanted = TensorSpec(field, tensor.datatype, tensor.shape)
    have = request.get(field)
    if have is None:
        request[field] = wanted
        reader[field] = index
    elif have != wanted:
        raise _error("signature_mismatch", index, stage, ids[index],
                     f"request field {field!r} feeds input {tensor.name!r} ({tensor.datatype} {list(tensor.shape)}) "
                     f"but stage {reader[field]} reads it as {have.datatype} {list(have.shape)}", tensor=tensor.name)


def _lookup(index, ref, ids, position, signatures, request, known) -> TensorSpec:
    if not ref.stage:
        spec = request.get(ref.tensor)
        if spec is None:
            raise conditions.ConditionError(
                f"{ref.tensor!r} is neither '<stage>.<output>' nor a request field (those are {sorted(request)})")
        return spec
    if ref.stage not in position:
        raise conditions.ConditionError(f"unknown stage {ref.stage!r} (the stages are {ids})")
    if ref.stage == ids[index]:
        raise conditions.ConditionError("a stage's condition cannot read the stage's own outputs")
    outputs = signatures[position[ref.stage]][1]
    spec = next((t for t in outputs if t.name == ref.tensor), None)
    if spec is None:
        raise conditions.ConditionError(f"stage {ref.stage!r} has no output {ref.tensor!r} (it gives {[t.name for t in outputs]})")
    return spec


def _check_acyclic(defs: list[StageSpec], ids: list[str], waits: list[list[str]]) -> None:
    position = {stage_id: i for i, stage_id in enumerate(ids)}
    state = [0] * len(ids)  # 0 new, 1 on the path, 2 done
    path: list[int] = []

    def visit(i: int) -> None:
        state[i] = 1
        path.append(i)
        for stage_id in waits[i]:
            j = position[stage_id]
            if state[j] == 1:
                cycle = [ids[k] for k in path[path.index(j):]] + [ids[j]]
                raise _error("cycle", j, defs[j], ids[j], f"the stages wait for each other in a cycle: {' -> '.join(reversed(cycle))}",
                             stages=cycle[:-1])
            if state[j] == 0:
                visit(j)
        path.pop()
        state[i] = 2

    for i in range(len(ids)):
        if state[i] == 0:
            visit(i)


def branches(plan: PipelinePlan) -> dict[str, frozenset[tuple[frozenset[str], str]]]:
    """For each stage, the switch branches it lies on: (the switch's ``after``, the branch
    stage's id), inherited from the stages it reads."""
    by_id = {s.id: s for s in plan.stages}
    memo: dict[str, frozenset] = {}

    def of(stage_id: str) -> frozenset:
        if stage_id not in memo:
            s = by_id[stage_id]
            own = {(frozenset(s.after), s.id)} if (s.when or s.default) else set()
            read = {b.stage for b in s.bindings if b.stage} | {r.stage for r in _cond_refs(s) if r.stage}
            memo[stage_id] = frozenset(own.union(*(of(d) for d in read)))
        return memo[stage_id]

    return {s.id: of(s.id) for s in plan.stages}


def _cond_refs(stage: StagePlan) -> list[conditions.Ref]:
    return conditions.refs(conditions.parse(stage.when)) if stage.when else []


def _exclusive(a: frozenset, b: frozenset) -> bool:
    return any(switch == other and branch != theirs for switch, branch in a for other, theirs in b)


def answer_fields(plan: PipelinePlan) -> tuple[AnswerField, ...]:
    """The answer's fields: the outputs of the stages nothing waits for (see the module)."""
    waited = {d for s in plan.stages for d in s.after}
    sinks = [s for s in plan.stages if s.id not in waited]
    on = branches(plan)
    by_name: dict[str, list[tuple[StagePlan, TensorSpec]]] = {}
    for s in sinks:
        for t in s.outputs:
            by_name.setdefault(t.name, []).append((s, t))
    fields: list[AnswerField] = []
    for name, makers in by_name.items():
        same = all(t == makers[0][1] for _, t in makers)
        apart = all(_exclusive(on[a.id], on[b.id]) for i, (a, _) in enumerate(makers) for b, _ in makers[i + 1:])
        if len(makers) == 1 or (same and apart):
            fields.append(AnswerField(makers[0][1], tuple(Source(s.id, name) for s, _ in makers)))
        else:
            fields.extend(
                AnswerField(TensorSpec(f"{s.id}.{name}", t.datatype, t.shape), (Source(s.id, name),)) for s, t in makers
            )
    return tuple(fields)
