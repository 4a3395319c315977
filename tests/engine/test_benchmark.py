"""``bench --quick``: the figures are all there and sane (a smoke run, not a timing test)."""

from __future__ import annotations

import json

import pytest

from siamese_analog_plugin.cli import main

KEYS = {"e2e_cells_per_s", "model_cells_per_s", "ratio_to_model", "speedup_vs_naive", "peak_rss_mb", "requery_s"}


@pytest.mark.slow
def test_quick_bench_prints_the_figures_as_json_last(capsys, tmp_path):
    assert main(["bench", "--quick", "--cells", "64", "--rss-cells", "64,256", "--naive-seconds", "0.5",
                 "--requery-cells", "900", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert KEYS <= figures.keys()
    assert any(line.startswith("End to end") for line in lines[:-1])
    for key in ("e2e_cells_per_s", "model_cells_per_s", "speedup_vs_naive", "requery_s", "e2e_resampled_cells_per_s"):
        assert figures[key] > 0
    assert figures["resampled_read_mode"] == "rows" and figures["resampled_cells"] > 0
    assert 0 < figures["ratio_to_model"] < 5
    assert figures["cells"] == 64 and figures["requery_cells"] == 256
    assert set(figures["peak_rss_mb"]) == {"64", "256"}
    assert all(50 < mb < 4000 for mb in figures["peak_rss_mb"].values())
    assert "tiny" in figures["model"] and figures["read_mode"] == "block"
    assert figures["requery_1m_cells"] == 900 and figures["requery_1m_s"] > 0 and figures["embed_area_s"] > 0
    assert 0 < figures["embedding_bytes_per_cell"] < 4 * 9 + 64  # half precision (D + 1 bands), plus the header
