"""Print the results table of results/<study>/report.md (for README's results sections).

    python results/readme_table.py [lottery|sweep]
"""

import sys
from pathlib import Path

study = sys.argv[1] if len(sys.argv) > 1 else "lottery"
text = Path(__file__).with_name(study).joinpath("report.md").read_text()
start = text.index("| Setting |")
print(text[start:text.index("\n\n", start)])
