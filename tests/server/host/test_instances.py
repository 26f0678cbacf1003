"""repository_with_instances: a copy of the model repository with another ranker instance count."""

import pytest

from server.host.instances import repository_with_instances


def test_count_and_shared_table_are_rewritten_and_nothing_else(tmp_path):
    from server.host.launcher import DEFAULT_MODEL_REPOSITORY

    repo = repository_with_instances(tmp_path / "repo", 3, shared_table=False)
    shipped = (DEFAULT_MODEL_REPOSITORY / "ranker" / "config.pbtxt").read_text()
    written = (repo / "ranker" / "config.pbtxt").read_text()
    assert "count: 3" in written and 'string_value: "false"' in written
    assert written.replace("count: 3", "count: 1").replace('"false"', '"true"') == shipped
    assert (repo / "ranker" / "1" / "model.py").is_file() and (repo / "baseline" / "config.pbtxt").is_file()


def test_a_count_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="instance count requires >= 1, got 0"):
        repository_with_instances(tmp_path / "repo", 0)
