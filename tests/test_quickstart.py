"""The README's main job runs end to end."""

from __future__ import annotations

import json

from adalora_fast.__main__ import main


def test_quickstart_runs(tmp_path, capsys):
    main(["--out", str(tmp_path / "ckpt"), "--steps", "20", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "merged vs unmerged logits" in out
    cfg = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert sum(sum(p) for p in cfg["rank_pattern"].values()) == 4 * len(cfg["rank_pattern"])
