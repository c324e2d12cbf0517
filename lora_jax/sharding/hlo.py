"""What a compiled program communicates: :func:`collectives` reads its HLO text.

A small reader of XLA's HLO text format, for tests and benchmarks that check which
collectives a sharded train step runs and what each all-gather moves.
"""

from __future__ import annotations

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective in a compiled program.

    Attributes:
      op: ``"all-gather"``, ``"all-reduce"``, ``"reduce-scatter"``, ``"all-to-all"`` or
        ``"collective-permute"``.
      shapes: per-device result shapes (several for a combined all-reduce).
      nbytes: bytes of the results on one device.
      source: for an all-gather, what is gathered, found by following its operand back
        through data movement: ``"parameter"`` (an input, e.g. a frozen weight shard),
        ``"sum"`` (a float add, e.g. the merged weight ``W0 + s·A·B``), ``"product"`` (a
        matmul result such as ``ΔW = s·A·B`` on its own), or the producing op's name.
      name: the HLO instruction name.
    """

    op: str
    shapes: tuple[tuple[int, ...], ...]
    nbytes: int
    source: str | None
    name: str


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_MOVES = {"bitcast", "copy", "transpose", "reshape", "collective-permute", "dynamic-slice",
          "slice", "all-gather", "broadcast", "convert", "pad", "concatenate", "copy-start",
          "copy-done", "optimization-barrier", "get-tuple-element", "tuple"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*?)\)(.*)$")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}  # else the digits: s4, u8, f32...


def collectives(compiled) -> list[Collective]:
    """Lists the collectives of a compiled program (``jax.jit(f).lower(...).compile()``, or
    its HLO text), to check what a sharded step communicates.

    >>> import jax, jax.numpy as jnp
    >>> collectives(jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile())
    []
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    instrs, comps, comp = {}, {}, None
    for line in text.splitlines():
        if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
            comp = line.split()[0].lstrip("%")
            if comp == "ENTRY":
                comp = line.split()[1].lstrip("%")
            comps[comp] = []
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, typ, op, args, rest = m.groups()
        calls = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest)
        instrs[name] = (typ, op, re.findall(r"%([\w.\-]+)", args), calls)
        if comp is not None:
            comps[comp].append(name)

    def shapes(typ):
        return [(dt, tuple(int(d) for d in dims.split(",") if d))
                for dt, dims in _SHAPE.findall(typ)]

    def nbytes(typ):
        return sum(-(-math.prod(s) * _BITS.get(dt, int(re.sub(r"\D", "", dt) or 8)) // 8)
                   for dt, s in shapes(typ))

    def ops_in(comp_names, seen=None):
        seen = set() if seen is None else seen
        found = set()
        for c in comp_names:
            if c in seen or c not in comps:
                continue
            seen.add(c)
            for i in comps[c]:
                typ, op, _, calls = instrs[i]
                is_float = any(dt[0] in "fb" for dt, _ in shapes(typ))
                found.add((op, is_float))
                found |= ops_in(calls, seen)
        return found

    def source(name, depth=0):
        if name not in instrs or depth > 64:
            return None
        typ, op, operands, calls = instrs[name]
        if op == "parameter":
            return "parameter"
        if op in ("dot", "convolution"):
            return "product"
        if op == "add" and any(dt[0] in "fb" for dt, _ in shapes(typ)):
            return "sum"
        if op in ("fusion", "custom-call", "call") or calls:
            inner = ops_in(calls)
            has_dot = any(o in ("dot", "convolution") for o, _ in inner)
            has_add = ("add", True) in inner
            if has_add:
                return "sum"
            if has_dot:
                return "product"
        elif op not in _MOVES:
            return op
        if not operands:
            return op
        big = max(operands, key=lambda o: nbytes(instrs[o][0]) if o in instrs else -1)
        return source(big, depth + 1)

    out = []
    for name, (typ, op, operands, _) in instrs.items():
        base = op.removesuffix("-start")
        if base not in _COLLECTIVES or op.endswith("-done"):
            continue
        src = source(operands[0]) if base == "all-gather" and operands else None
        out.append(Collective(base, tuple(s for _, s in shapes(typ)), nbytes(typ), src, name))
    return out
