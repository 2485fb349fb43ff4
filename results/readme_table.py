"""Print the results table of results/lottery/report.md (for README's results section)."""

from pathlib import Path

text = Path(__file__).with_name("lottery").joinpath("report.md").read_text()
start = text.index("| Setting |")
print(text[start:text.index("\n\n", start)])
