"""The documentation's code runs, and its links resolve.

Every ```python block of every page under docs/ (and README.md's quickstart) runs, the
blocks of a page in order in one namespace (a page is one script a reader could paste), each
page in a fresh namespace. The pages run in one subprocess with 8 forced CPU devices, as the
sharding page needs: JAX's device count is fixed when it starts. Blocks fenced as ```text or
```bash are not run. The pages ``assert`` on their own results (adapted output equals merged
output, a weight stayed frozen, ...), so an example that no longer matches the API fails here.

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
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
TIMEOUT_S = 300


def pages() -> list[pathlib.Path]:
    """Every page under docs/ with Python examples, and the README (its quickstart)."""
    return [*sorted(p for p in DOCS.rglob("*.md") if FENCE.search(p.read_text())), README]


def page_name(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(page: pathlib.Path) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block.

    Of README.md only the quickstart runs: its other blocks are fragments that continue
    from a model of the reader's own.
    """
    text = page.read_text()
    found = [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]
    if page == README:
        start = text.count("\n", 0, text.index("\n## Quickstart\n"))
        found = [b for b in found if b[0] > start][:1]
    return found


def run_pages(names: list[str]) -> dict:
    """Runs the pages in this process; returns {page: error or None} and timings."""
    import matplotlib

    matplotlib.use("Agg")
    out = {}
    for name in names:
        page = ROOT / name
        t0, c0 = time.perf_counter(), time.process_time()
        ns: dict = {"__name__": f"docs:{name}"}
        err = None
        cwd = os.getcwd()
        os.chdir(pathlib.Path(os.environ["DOCS_TMP"]) / name.replace("/", "_"))
        try:
            for line, code in blocks(page):
                try:
                    exec(compile(code, f"{name}:{line}", "exec"), ns)
                except BaseException:
                    err = f"{name}, block at line {line}:\n{traceback.format_exc()}"
                    break
        finally:
            os.chdir(cwd)
        out[name] = {"error": err, "seconds": round(time.perf_counter() - t0, 1),
                     "cpu_seconds": round(time.process_time() - c0, 1)}
    return out


def test_docs_have_examples():
    names = {page_name(p) for p in pages()}
    assert {"docs/index.md", "docs/guide/linen.md", "docs/guide/nnx.md", "docs/guide/sharding.md",
            "README.md"} <= names, names
    assert len(blocks(README)) == 1 and "lora_jax.init" in blocks(README)[0][1]


def test_doc_examples_run(tmp_path):
    names = [page_name(p) for p in pages()]
    for n in names:
        (tmp_path / n.replace("/", "_")).mkdir()
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
    failed = [r["error"] for r in results.values() if r["error"]]
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
