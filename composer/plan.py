"""What every build method's plan shares: resolving the spec's inputs, the consent check, the
steps a plan lists and how ``composer build --check`` prints it.

Each method family plans in its own package (composer.compose.plan, composer.merging.plan);
both produce a ``BuildPlan`` so that the build lifecycle (composer.build) and the CLI can treat
every plan alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

from composer.errors import OptedOutError, located
from composer.inputs import ResolvedInput, Resolver
from composer.spec import Spec
from registry.errors import ComposerError


@dataclass(frozen=True)
class Step:
    name: str
    detail: str


class BuildPlan(Protocol):
    """What the lifecycle, the manifest and the CLI read of any method's plan."""

    spec: Spec
    method: str  # "upcycle", "compose/<style>", "merge/<algorithm>", "moe_merge/<algorithm>"
    base: ResolvedInput
    experts: list[ResolvedInput]
    steps: list[Step]
    notes: list[str]


def render(rows: list[tuple[str, str]], steps: list[Step], notes: list[str]) -> str:
    """A plan as ``composer build --check`` prints it: aligned rows, numbered steps, notes."""
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("steps:")
    lines += [f"  {i + 1}. {s.name}: {s.detail}" for i, s in enumerate(steps)]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def ranges(xs: list[int]) -> str:
    """Sorted layer indices as ranges: [0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    for x in xs:
        if out and out[-1].split("-")[-1] == str(x - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        else:
            out.append(str(x))
    return ",".join(out)


def resolve_inputs(spec: Spec, resolver: Resolver) -> tuple[ResolvedInput, list[ResolvedInput]]:
    """The spec's base and experts resolved; an input that cannot be resolved is an error at the
    spec line that names it (``file:line: base:`` / ``experts[i]:``)."""
    try:
        base = resolver.resolve(spec.base, role="base")
    except ComposerError as e:
        raise located(e, spec.where("base")) from None
    experts = []
    for i, entry in enumerate(spec.experts):
        try:
            r = resolver.resolve(entry.ref, role="expert")
        except ComposerError as e:
            raise located(e, spec.where("experts", i)) from None
        experts.append(dataclasses.replace(r, name=entry.name) if entry.name else r)
    return base, experts


def check_consent(spec: Spec, base: ResolvedInput, experts: list[ResolvedInput]) -> None:
    """Refuse every input whose owner opted out, naming all of them in one error (at the spec
    line of the first)."""
    inputs = [(("base",), base), *((("experts", i), e) for i, e in enumerate(experts))]
    out = [(loc, r) for loc, r in inputs if r.policy == "opt_out"]
    if out:
        who = ", ".join(f"'{r.name}' (owner {r.owner or 'unknown'})" for _, r in out)
        raise OptedOutError(
            f"{spec.where(*out[0][0])}: refused: the owners of these inputs have opted out: {who}"
        )


@dataclass
class Written:
    """What a method's executor left in the build's temporary folder."""

    files: dict[str, str]  # output file name -> sha256, as BuildResult reports them
    manifest: dict[str, Any]  # composition.json, which the lifecycle writes last
