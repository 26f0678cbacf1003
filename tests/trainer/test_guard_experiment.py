"""``experiment guard --quick``: the JSON the issue names, the PNG, and the guard acting where it should."""

import json

import pytest

from server.features import shipped_schema
from trainer.guard_experiment import format_guard, run_guard, write_guard_outputs
from trainer.online import configure_torch

SCHEMA = shipped_schema()


@pytest.mark.slow  # 17 s: the whole guard experiment, quick settings (outside the quick loop, in the suite)
def test_guard_quick(tmp_path):
    configure_torch()  # one thread, as the command runs it
    result = run_guard(SCHEMA, seeds=1, quick=True)
    keys = {"scenario", "variant", "auc_before", "auc_during", "auc_after", "rollbacks"}
    assert all(keys <= row.keys() for row in result["rows"])
    assert {(r["scenario"], r["variant"]) for r in result["rows"]} == {
        ("clean", "online"), ("clean", "online+guard"), *((s, v) for s in ("poison", "drift")
                                                           for v in ("frozen", "online", "online+guard"))}
    for key in ("poison_auc_drop_guarded", "poison_auc_drop_unguarded", "drift_recovery_examples_guarded",
                "drift_recovery_examples_unguarded", "clean_false_alarm_rate"):
        assert key in result
    by = {(r["scenario"], r["variant"]): r for r in result["rows"]}
    assert by[("poison", "online+guard")]["rollbacks"] >= 1 and by[("poison", "online+guard")]["rows_rolled_back"] > 0
    assert by[("clean", "online+guard")]["rollbacks"] == 0
    assert by[("drift", "online+guard")]["rollbacks"] == 0
    assert all(r["rollbacks"] == 0 for r in result["rows"] if r["variant"] != "online+guard")
    for row in result["rows"]:
        assert 0.4 < row["auc_before"] < 1.0
    write_guard_outputs(result, tmp_path)
    assert json.loads((tmp_path / "guard.json").read_text())["experiment"] == "guard"
    assert (tmp_path / "guard.png").stat().st_size > 1000
    assert "poison AUC drop" in format_guard(result)
