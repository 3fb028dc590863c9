"""Result files shared by ``nnunet-mamba benchmark`` and ``nnunet-mamba learning-benchmark``: aligned console
tables, Markdown tables, CSV files and horizontal bar charts (matplotlib, imported on use)."""
from __future__ import annotations

import csv
from typing import Any
from collections.abc import Collection, Iterable, Mapping, Sequence


def aligned_lines(cells: Sequence[Sequence[str]], left: Collection[int], pad: int = 0, sep: str = "  ") -> list[str]:
    """Rows of ``cells`` as console lines: each column as wide as its widest cell plus ``pad``, the columns of
    ``left`` left-aligned and the others right-aligned, joined by ``sep``, trailing blanks stripped."""
    widths = [max(len(row[i]) for row in cells) + pad for i in range(len(cells[0]))]
    return [sep.join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in cells]


def markdown_table(header: str, titles: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table under an HTML comment holding ``header`` (what was measured, where)."""
    lines = [f"<!-- {header} -->", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_lines(path: str, lines: Sequence[str]) -> None:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_csv(path: str, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """The ``fields`` of each row (a missing one is left empty, other keys are ignored)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display on cluster nodes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_panel(ax: Any, names: Sequence[str], values: Sequence[float], baseline: Sequence[bool], label: str,
              value_format: str, xerr: Sequence[float] | None = None) -> None:
    """Horizontal bars, baselines grey, each bar annotated with its value; ``names`` top to bottom as given."""
    names, values, baseline = names[::-1], values[::-1], baseline[::-1]  # barh draws the first name lowest
    ax.barh(names, values, xerr=None if xerr is None else xerr[::-1],
            color=["0.6" if b else "C0" for b in baseline])
    ax.set_xlabel(label)
    for y, v in enumerate(values):
        ax.annotate(format(v, value_format), (v, y), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=8)
