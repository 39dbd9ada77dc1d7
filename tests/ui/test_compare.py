"""The comparison view's pure parts: the Pareto frontier of L0 against FVU or CE loss score, the frame of SAEs,
which point a click chose; the Jobs page's frames of a sweep's members."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from sae_core.outputs import MemberStatus
from sae_core.ui import compare, frames


def test_the_frontier_keeps_what_no_other_point_beats_in_order_of_l0():
    l0 = [4, 8, 16, 32, 8, None, 2]
    fvu = [0.30, 0.35, 0.10, 0.10, 0.20, 0.01, math.nan]
    # 8/0.35 is beaten by 8/0.20; 32/0.10 by 16/0.10; the last two lack a figure
    assert compare.pareto_frontier(l0, fvu, higher_is_better=False) == [0, 4, 2]
    score = [0.5, 0.6, 0.9, 0.95, 0.4, 1.0, math.nan]
    assert compare.pareto_frontier(l0, score, higher_is_better=True) == [0, 1, 2, 3]
    assert compare.pareto_frontier([1, 1], [0.5, 0.5], higher_is_better=False) == [0, 1]  # a tie: both
    assert compare.pareto_frontier([], [], higher_is_better=False) == []


def test_the_frontier_matches_a_brute_force_check():
    import random

    rng = random.Random(0)
    for _ in range(50):
        xs = [rng.choice([1, 2, 3, 4, 5]) for _ in range(12)]
        ys = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(12)]

        def beaten(i, xs=xs, ys=ys):
            return any(xs[j] <= xs[i] and ys[j] <= ys[i] and (xs[j], ys[j]) != (xs[i], ys[i]) for j in range(12))

        expected = {i for i in range(12) if not beaten(i)}
        assert set(compare.pareto_frontier(xs, ys, higher_is_better=False)) == expected


def test_the_comparison_frame_reads_each_eval_json_and_marks_both_frontiers(tmp_path):
    entries = []
    for name, figures in [("a", {"l0": 4, "fvu": 0.3}), ("b", {"l0": 8, "fvu": 0.2, "ce_loss_score": 0.9}),
                          ("c", {"l0": 9, "fvu": 0.25, "ce_loss_score": 0.8})]:  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(figures))
        (tmp_path / name / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_sae": 64}))
        entries.append(compare.Compared(name, tmp_path / name, {"k": len(name)}))
    frame = compare.comparison_frame(entries, tmp_path)
    assert frame["folder"].tolist() == ["a", "b", "c"] and frame["d_sae"].tolist() == [64.0] * 3
    assert frame["frontier_fvu"].tolist() == [True, True, False]
    assert frame["frontier_ce"].tolist() == [False, True, False]  # a has no CE score; c is beaten by b
    assert pd.isna(frame["ce_loss_score"].iloc[0]) and frame["config"].iloc[0] == '{"k": 1}'
    outside = compare.comparison_frame([compare.Compared("x", Path("/elsewhere"))], tmp_path)
    assert outside["folder"].tolist() == [""]  # nothing to open in Explore


def test_a_click_selects_its_point_folder():
    event = {"selection": {"picked": [{"folder": "jobs/5/k=4"}]}}
    assert compare.clicked_folder(event, "picked") == "jobs/5/k=4"
    for nothing in (None, {}, {"selection": {}}, {"selection": {"picked": []}}, {"selection": {"picked": [3]}}):
        assert compare.clicked_folder(nothing, "picked") is None


def test_members_table_and_lines():
    members = [
        MemberStatus("a", Path("a"), {}, "completed", None, {"fvu": 0.1, "l0": 4.0}),
        MemberStatus("b", Path("b"), {}, "running", None, {}),
        MemberStatus("c", Path("c"), {}, "failed", "loss: not finite", {}),
    ]
    metrics = pd.DataFrame(
        {
            "member": ["a", "b", "a", "b"],
            "step": [10, 10, 20, 20],
            "loss": [1.0, 2.0, 0.5, 1.5],
            "fvu": [0.3, 0.4, 0.2, 0.35],
            "l0": [5.0, 6.0, 4.5, 5.5],
        }  # fmt: skip
    )
    table = frames.members_table(members, metrics, live=True)
    assert table["Member"].tolist() == ["a", "b", "c"] and table["Status"].tolist() == [
        "completed",
        "running",
        "failed",
    ]
    assert table["Step"].tolist()[:2] == [20, 20] and pd.isna(table["Step"].iloc[2])
    assert table["FVU"].tolist()[:2] == [0.1, 0.35] and table["L0"].tolist()[:2] == [4.0, 5.5]  # eval.json first
    assert table[["FVU", "L0"]].iloc[2].isna().all() and table["Error"].tolist() == ["", "", "loss: not finite"]
    assert frames.members_table(members, metrics, live=False)["Status"].tolist()[1] == "not finished"
    lines = frames.member_lines(metrics, ["b"], "loss")
    assert lines.to_dict("list") == {"step": [10, 20], "member": ["b", "b"], "value": [2.0, 1.5]}
    assert frames.member_metrics(metrics) == ["loss", "fvu", "l0"]
