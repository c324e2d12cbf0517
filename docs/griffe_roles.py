"""A griffe extension (mkdocs.yml, mkdocstrings ``extensions:``): docstrings as Markdown.

Doctest examples (``>>>`` lines and their output, up to a blank line) become ``pycon`` code
blocks; Markdown would read ``>>>`` as nested quotes and ``x["kernel"]`` as a link.

The docstrings cross-reference with Sphinx roles (``:func:`lora_jax.init```,
``:class:`~lora_jax.checkpoint.Manager```, ``:func:`specs``` inside ``lora_jax.sharding``),
which Markdown would print literally. Each becomes inline code; where the name resolves to an
object (as written, or relative to the docstring's class, module or a package above it), an
optional mkdocs-autorefs reference around it links to that object's entry in the API
reference, if the reference renders it. An object the reference does not render stays plain
code, so the strict build never fails on a role.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|data|attr|exc|obj):`([^`]+)`")


def _candidates(obj: griffe.Object, target: str) -> list[str]:
    out = [target]
    scope: griffe.Object | None = obj if obj.is_class or obj.is_module else obj.parent
    while scope is not None:
        out.append(f"{scope.path}.{target}")
        scope = scope.parent
    return out


def _resolve(collection, obj: griffe.Object, target: str) -> str | None:
    for path in _candidates(obj, target):
        try:
            # The object's own path: an identifier the reference registers for it, however
            # it is re-exported (``lora_jax.LoraWeight`` is ``lora_jax.leaves.LoraWeight``).
            return collection.get_member(path).canonical_path
        except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError,
                griffe.CyclicAliasError):
            continue
    return None


def fence_doctests(text: str) -> str:
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            out += [f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def rewrite(text: str, obj: griffe.Object, collection) -> str:
    def sub(m: re.Match) -> str:
        body = m.group(1).strip()
        explicit = re.fullmatch(r"(.*?)\s*<([^>]+)>", body)
        if explicit:
            title, target = explicit.group(1), explicit.group(2)
        else:
            target = body.lstrip("~")
            title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        target = target.lstrip("~").removesuffix("()")
        path = _resolve(collection, obj, target)
        code = f"<code>{title}</code>"
        return f'<autoref identifier="{path}" optional>{code}</autoref>' if path else code

    return ROLE.sub(sub, fence_doctests(text))


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        seen: set[int] = set()

        def walk(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj, loader.modules_collection)
            for member in obj.members.values():
                if not member.is_alias:
                    walk(member)  # type: ignore[arg-type]

        walk(pkg)
