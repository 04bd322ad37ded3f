"""`mim-fast ablate`: the cells' configs, the summary statistics and a smoke run of the command (the real
table is benchmarks/results/ablation, made with the full command; it does not run here)."""
import json
import math

import pytest
import torch

from mim_fast import ablate, cli
from mim_fast import train as T


def test_cells_change_only_their_row_and_column():
    demo = T.TrainConfig(preset="demo")
    for upn in ablate.UPN_ROWS:
        for kgs in ablate.KGS_COLUMNS:
            cfg = ablate.cell_config(upn, kgs, 3, None, "x")
            changed = cfg.overrides()
            assert cfg.preset == "demo" and cfg.seed == 3 and cfg.epochs == demo.epochs
            if upn == "none":
                assert changed.pop("upn") is False
            elif upn == "published":  # every UPN setting is the mim preset's
                assert all(getattr(cfg, k) == T.PRESETS["mim"][k] for k in ablate.UPN_FIELDS)
                for k in ablate.UPN_FIELDS:
                    changed.pop(k, None)
            if kgs == "off":
                assert changed.pop("kgs_transfer") is False and cfg.per_sample == demo.per_sample
            elif kgs == "batch":
                assert changed.pop("per_sample") is False
            else:
                assert cfg.per_sample is True and cfg.kgs_transfer is True
            assert changed == {}, (upn, kgs)


def test_summary_is_mean_and_sample_std():
    runs = [{"upn": "ours", "kgs": "off", "seed": s, "epochs": 2, "mae": v, "corr": 0.5, "acc2": 0.9,
             "closed_impure": ci, "closed_clean": 0.1, "closed": {"text": [ci, 0.1], "audio": [ci, 0.1]}}
            for s, v, ci in ((0, 1.0, 0.8), (1, 2.0, 0.9), (2, 3.0, 1.0))]
    (row,) = ablate.summarize(runs)
    assert row["mae"] == (2.0, 1.0)  # sample std (ddof 1) of 1, 2, 3
    assert row["closed_impure"][0] == pytest.approx(0.9) and row["closed_impure"][1] == pytest.approx(0.1)
    assert row["per_modality"]["audio"]["closed_clean"] == (pytest.approx(0.1), pytest.approx(0.0))
    md = ablate.markdown([row])
    assert "| UPN (ours) | KGS off | 2.000 ± 1.000 |" in md and "0.90 / 0.10" in md


def test_smoke_run_of_the_command(tmp_path):
    out = tmp_path / "abl"
    args = ["ablate", "--smoke", "--epochs", "1", "--seeds", "0", "--out", str(out),
            "--threads", str(torch.get_num_threads())]  # leave this process's thread count alone
    assert cli.main(args) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {(r["upn"], r["kgs"]) for r in runs} == {(u, k) for u in ablate.UPN_ROWS for k in ablate.KGS_COLUMNS}
    saved = json.loads((out / "ablation.json").read_text())
    assert len(saved["rows"]) == 9 and all(math.isfinite(r["mae"][0]) for r in saved["rows"])
    assert (out / "ablation.png").stat().st_size > 0 and "per-sample routing" in (out / "ablation.md").read_text()
    none = [r for r in runs if r["upn"] == "none"]
    assert all(r["closed_impure"] == r["closed_clean"] == 0.0 for r in none)  # no UPN: every gate open
    # resuming: nothing left to run, the same table
    before = (out / "ablation.md").read_text()
    assert cli.main(args) == 0
    assert (out / "runs.jsonl").read_text().count("\n") == 9 and (out / "ablation.md").read_text() == before
