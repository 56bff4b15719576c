"""File names and labels from outside print on one line, as written (issue 15): no newline or
terminal escape breaks the console output, no Rich markup restyles it."""

from __future__ import annotations

import pytest
from rich.console import Console

from loop.cli.common import safe
from loop.errors import printable


@pytest.mark.parametrize(
    ("raw", "printed"),
    [
        ("line\nbreak.png", "line\\nbreak.png"),
        ("[bold red]alarm[/].png", "\\[bold red]alarm\\[/].png"),
        ("esc\x1b[31mred.png", "esc\\x1b[31mred.png"),
        ("tab\there\r.png", "tab\\there\\r.png"),
        ("défaut_ß.png", "défaut_ß.png"),
    ],
)
def test_safe_console_text_known_answers(raw, printed):
    assert safe(raw) == printed
    assert printable(raw) == printed.replace("\\[", "[")  # logs: no markup to escape


def test_file_names_print_on_one_line_without_markup():
    con = Console(width=200, record=True, color_system=None)
    name = "evil[/]\n[red]x"
    con.print(f"skipped {safe(name)}: bad")
    assert con.export_text().strip() == "skipped evil[/]\\n[red]x: bad"
