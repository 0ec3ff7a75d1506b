"""The offline HTML rendering of reports: structure of tables, images, text."""

import base64
import re

from diverse.evaluation.html import markdown_to_html

PNG = base64.b64decode(  # a 1×1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_tables_scroll_in_their_own_box_with_unbroken_cells(tmp_path):
    (tmp_path / "p.png").write_bytes(PNG)
    md = ("# Title `x`\n\n| config | accuracy |\n|---|---|\n| a | **0.9 ± 0.1** |\n"
          "| b | 0.8 ± 0.0 |\n\n![a plot](p.png)\n\nsome <text>\n")
    page = markdown_to_html(md, tmp_path, "t")
    tables = re.findall(r'<div class="wide"><table>(.*?)</table></div>', page)
    assert len(tables) == 1
    assert tables[0].count("<tr>") == 3  # header + 2 rows; the |---| line is dropped
    assert "<td><strong>0.9 ± 0.1</strong></td>" in tables[0]
    assert "white-space: nowrap" in page and ".wide { overflow-x: auto;" in page
    assert "<h1>Title <code>x</code></h1>" in page
    assert f'src="data:image/png;base64,{base64.b64encode(PNG).decode()}"' in page
    assert "some &lt;text&gt;" in page  # text is escaped
