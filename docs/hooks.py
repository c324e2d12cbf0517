"""MkDocs hooks (mkdocs.yml ``hooks:``): the notebooks of notebooks/ become pages of the site.

The notebooks live in notebooks/ at the repository root (where users and the test suite
expect them), outside ``docs_dir``; this adds them, and that folder's README as the
notebooks' index, as if they were under ``docs/notebooks/``. It runs before mkdocs-jupyter's
own ``on_files``, which then renders the ``.ipynb`` files (without executing them: the test
suite does that, tests/test_notebooks.py).
"""

from __future__ import annotations

import pathlib

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parent.parent


@event_priority(100)  # before mkdocs-jupyter (priority 0) turns .ipynb files into pages
def on_files(files: Files, config) -> Files:
    for path in sorted((ROOT / "notebooks").iterdir()):
        if path.suffix == ".ipynb" or path.name == "README.md":
            # A file of the repository root's tree, not a generated one: mkdocs-jupyter reads
            # a notebook through its source directory.
            files.append(File(f"notebooks/{path.name}", src_dir=str(ROOT),
                              dest_dir=config.site_dir,
                              use_directory_urls=config.use_directory_urls))
    return files
