"""Plain-text and Markdown tables for the CLI and reports."""

from __future__ import annotations

from collections.abc import Sequence


def _cells(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> tuple[list[str], list[list[str]], list[int]]:
    head = [str(h) for h in headers]
    body = [[str(c) for c in row] for row in rows]
    widths = [max([len(head[i])] + [len(r[i]) for r in body]) for i in range(len(head))]
    return head, body, widths


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align_numbers: bool = True) -> str:
    """A fixed-width table; numeric-looking cells are right-aligned unless ``align_numbers`` is False."""
    head, body, widths = _cells(headers, rows)

    def line(cells: list[str]) -> str:
        out = []
        for cell, width in zip(cells, widths, strict=True):
            plain = cell.replace(",", "").replace(".", "", 1).replace("-", "", 1).replace("%", "")
            numeric = align_numbers and plain.isdigit()
            out.append(cell.rjust(width) if numeric else cell.ljust(width))
        return "  ".join(out).rstrip()

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    head, body, _ = _cells(headers, rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
