"""The documentation's code runs, and its links resolve.

Every ```python block of README.md and of every page under docs/ runs, each in a fresh
namespace: a reader can paste any block alone. A block preceded by the line
``<!-- continues -->`` (and a blank line; invisible on GitHub and on the site) instead runs
after the block before it, in its namespace: the pages use that sparingly, the README never.
The blocks run in one subprocess with 8 forced CPU devices, as the sharding page needs: JAX's
device count is fixed when it starts. Blocks fenced as ```text or ```bash are not run. The
blocks ``assert`` on their own results (adapted output equals merged output, a weight stayed
frozen, ...), so an example that no longer matches the API fails here.

``mkdocs build --strict`` (in CI, after the tests) checks the site's internal links, anchors
and API cross-references; the link test below checks the Markdown files that live outside
the site (README, ARCHITECTURE, notebooks/README) without needing mkdocs.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONTINUES = "<!-- continues -->"
FENCE = re.compile(r"^(" + re.escape(CONTINUES) + r"\n\n)?```python[^\n]*\n(.*?)^```",
                   re.S | re.M)
TIMEOUT_S = 900  # wall clock: the machine may be shared


def pages() -> list[pathlib.Path]:
    """Every page under docs/ with Python examples, and the README."""
    return [*sorted(p for p in DOCS.rglob("*.md") if FENCE.search(p.read_text())), README]


def page_name(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(page: pathlib.Path) -> list[tuple[int, str, bool]]:
    """(first line number, code, continues the previous block) of each ```python block."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2), m.group(1) is not None)
            for m in FENCE.finditer(text)]


def scripts(page: pathlib.Path) -> list[list[tuple[int, str]]]:
    """The blocks grouped into what runs in one namespace: a block and its continuations."""
    out: list[list[tuple[int, str]]] = []
    for line, code, continues in blocks(page):
        if continues and out:
            out[-1].append((line, code))
        else:
            out.append([(line, code)])
    return out


def run_pages(names: list[str]) -> dict:
    """Runs the pages in this process; returns {page: errors and timings}."""
    import matplotlib

    matplotlib.use("Agg")
    out = {}
    for name in names:
        page = ROOT / name
        t0, c0 = time.perf_counter(), time.process_time()
        errors = []
        cwd = os.getcwd()
        for n, script in enumerate(scripts(page)):
            folder = pathlib.Path(os.environ["DOCS_TMP"]) / f"{name.replace('/', '_')}-{n}"
            folder.mkdir()
            os.chdir(folder)
            ns: dict = {"__name__": f"docs:{name}:{n}"}
            try:
                for line, code in script:
                    try:
                        exec(compile(code, f"{name}:{line}", "exec"), ns)
                    except BaseException:
                        errors.append(f"{name}, block at line {line}:\n{traceback.format_exc()}")
                        break
            finally:
                os.chdir(cwd)
        out[name] = {"errors": errors, "seconds": round(time.perf_counter() - t0, 1),
                     "cpu_seconds": round(time.process_time() - c0, 1)}
    return out


def test_docs_have_examples():
    names = {page_name(p) for p in pages()}
    assert {"docs/index.md", "docs/guide/linen.md", "docs/guide/nnx.md", "docs/guide/sharding.md",
            "README.md"} <= names, names
    readme = blocks(README)
    assert len(readme) >= 3 and "lora_jax.init" in readme[0][1]
    assert not any(continues for _, _, continues in readme), "README blocks must stand alone"
    for page in pages():
        first = blocks(page)[0]
        assert not first[2], f"{page_name(page)}: its first block cannot continue another"


def test_every_python_fence_is_run():
    """A ```python fence the pattern misses (a marker without its blank line, say) would be
    silently skipped: count the fences independently."""
    for page in pages():
        fences = re.findall(r"^```python", page.read_text(), re.M)
        assert len(fences) == len(blocks(page)), page_name(page)
        markers = page.read_text().count(CONTINUES)
        assert markers == sum(c for _, _, c in blocks(page)), (
            f"{page_name(page)}: a {CONTINUES} marker not directly above a blank line and a fence")


def test_doc_examples_run(tmp_path):
    names = [page_name(p) for p in pages()]
    # The examples are tiny: XLA's compile time is nearly all of their cost, and the lowest
    # backend optimisation level cuts it by about a third (measured: 10.5 -> 6.8 s of CPU for
    # the Linen page) without changing what the examples check.
    env = dict(os.environ, DOCS_TMP=str(tmp_path), JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + " --xla_force_host_platform_device_count=8"
                          + " --xla_backend_optimization_level=0").strip(),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [
                   p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, __file__, *names], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(names)
    for name, r in results.items():
        print(f"{name}: {r['seconds']} s ({r['cpu_seconds']} s of CPU)")
    failed = [e for r in results.values() for e in r["errors"]]
    assert not failed, "\n\n".join(failed)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_markdown_links_outside_the_site_resolve():
    """Relative links in README.md, ARCHITECTURE.md and notebooks/README.md point at files."""
    broken = []
    for md in (ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "notebooks" / "README.md"):
        for target in LINK.findall(md.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            path = (md.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, broken


if __name__ == "__main__":
    print(json.dumps(run_pages(sys.argv[1:])))
