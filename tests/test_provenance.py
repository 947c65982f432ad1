"""Result tables keep their earlier run, labelled, when a benchmark moves to another reference."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from provenance import EARLIER_HEADING, write_result  # noqa: E402


def table(reference: str, value: str) -> str:
    return f"# Table\n\n- Reference: {reference}\n\n| a |\n|---|\n| {value} |\n"


def test_a_new_reference_keeps_the_old_table_labelled_and_a_rerun_keeps_it_too(tmp_path):
    out = tmp_path / "t.md"
    out.write_text("# Table\n\nno reference line, as tables were before\n\n| a |\n|---|\n| 1 |\n")
    write_result(out, table("stand-in", "2"), ["cmd"])
    text = out.read_text()
    assert text.index("| 2 |") < text.index(EARLIER_HEADING) < text.index("| 1 |")
    assert "\n### Table\n" in text  # the old title is demoted under the heading
    write_result(out, table("stand-in", "3"), ["cmd"])
    text = out.read_text()
    assert "| 2 |" not in text and text.count(EARLIER_HEADING) == 1
    assert text.index("| 3 |") < text.index(EARLIER_HEADING) < text.index("| 1 |")
    write_result(out, table("another", "4"), ["cmd"])
    text = out.read_text()  # the stand-in run becomes the earlier one
    assert "| 1 |" not in text and text.index("| 4 |") < text.index(EARLIER_HEADING) < text.index("| 3 |")
