"""An MkDocs hook (``hooks:`` in mkdocs.yml): the benchmark charts, straight from results/.

docs/benchmarks.md shows ``benchmarks/results/results.png`` and ``network.png``; they are
outside ``docs/``, so MkDocs would not copy them. This adds them to the site as
``benchmarks/results.png`` and ``benchmarks/network.png`` (no copy kept in docs/ to go
stale), and only those that exist: a chart the last run could not draw (no matplotlib)
is a broken link that ``mkdocs build --strict`` reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

CHARTS = ("results.png", "network.png")


def on_files(files: Files, config: Any) -> Files:
    results = Path(config.config_file_path).resolve().parent / "benchmarks" / "results"
    for name in CHARTS:
        source = results / name
        if source.exists():
            files.append(File.generated(config, f"benchmarks/{name}", abs_src_path=str(source)))
    return files
