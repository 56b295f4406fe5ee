"""`fedumm partition` past the per-client rows: distributions, no 1,500-row table."""

from __future__ import annotations

import json

from fedumm.cli import main


def test_a_large_population_is_summarised_not_listed(tmp_path, capsys):
    args = ["partition", "--clients", "1500", "data.train_scenes=400",
            "partition.min_per_client=1"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "clients" not in out and out["num_clients"] == 1500
    assert sum(out["client_sizes"]["histogram"]["counts"]) == 1500
    png = tmp_path / "sizes.png"
    assert main([*args, "--out", str(png)]) == 0
    text = capsys.readouterr().out
    assert "client sizes: p0=" in text and len(text.splitlines()) < 10
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
