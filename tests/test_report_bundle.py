"""HTML reports share one plotly.min.js per folder (a run directory holds the bundle once), still offline."""

from __future__ import annotations

import re

from compare_graphs import calib_qdq, cnn_data, small_cnn
from plotly.offline import get_plotlyjs

from calib.compare import compare
from calib.compare.html import PLOTLY_JS, inline_plotly, render_html, write_html
from calib.model import model_from_proto


def test_reports_in_one_folder_share_one_bundle_and_can_be_made_self_contained(tmp_path):
    m = model_from_proto(small_cnn())
    src = cnn_data(8)
    stats, _, q = calib_qdq(m, src)
    rep = compare(m, q, src)
    a = write_html(tmp_path / "report.a.html", rep, stats=stats).read_text()
    b = write_html(tmp_path / "report.b.html", rep, stats=stats, title="other").read_text()
    bundle = tmp_path / PLOTLY_JS
    assert sorted(p.name for p in tmp_path.iterdir()) == [PLOTLY_JS, "report.a.html", "report.b.html"]
    assert bundle.read_text() == get_plotlyjs()
    js = get_plotlyjs()
    for page in (a, b):
        assert js[:2000] not in page and len(page) < len(js) / 10  # the bundle is linked, not inlined
        assert page.count(f'<script src="{PLOTLY_JS}"></script>') == 1
        assert "<script src=\"http" not in page and "cdn" not in page.lower()
    inlined = inline_plotly(a)
    self_contained = render_html(rep, stats=stats)  # the old one-file form
    assert js in inlined and f'src="{PLOTLY_JS}"' not in inlined
    assert len(re.findall(r"Plotly\.newPlot", inlined)) == len(re.findall(r"Plotly\.newPlot", self_contained))
    before = bundle.stat().st_mtime_ns
    write_html(tmp_path / "report.a.html", rep, stats=stats)
    assert bundle.stat().st_mtime_ns == before  # an identical bundle is not rewritten
