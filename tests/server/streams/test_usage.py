"""Disk used per stream, as the metrics port reports it."""

from prometheus_client.parser import text_string_to_metric_families

from server.streams.usage import exposition, stream_bytes


def test_bytes_per_stream_count_allocated_blocks_and_skip_links(tmp_path):
    (tmp_path / "deltas").mkdir()
    (tmp_path / "deltas" / "00000001.seg").write_bytes(b"x" * 10_000)
    (tmp_path / "feature_log" / "ranker_0").mkdir(parents=True)
    (tmp_path / "feature_log" / "ranker_0" / "00000001.seg").write_bytes(b"y" * 5_000)
    (tmp_path / "feature_log" / "link").symlink_to(tmp_path / "deltas")  # not followed: counted once, under deltas
    used = stream_bytes(tmp_path)
    assert used["deltas"] >= 10_000 and 5_000 <= used["feature_log"] < 10_000
    assert used["snapshots"] == used["trainer"] == used["feedback_log"] == 0


def test_exposition_parses_as_prometheus_text(tmp_path):
    samples = {s.name: s for f in text_string_to_metric_families(exposition(tmp_path).decode()) for s in f.samples}
    assert samples["monolith_data_dir_size_bytes"].value >= samples["monolith_data_dir_free_bytes"].value > 0
    assert "monolith_stream_disk_bytes" in samples
