"""The bus configuration without a server: parsing, the environment round trip, credentials
files, and the shipped 3-node sample's permissions (the same as the test cluster's)."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.streams import Streams, open_streams
from server.streams.bus import BusConfig, BusError, read_credentials
from server.streams.nats_cluster import USERS

SAMPLE = Path(__file__).resolve().parents[3] / "server" / "streams" / "nats-3node.conf"


@given(replica=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
       ports=st.lists(st.integers(1, 65535), min_size=1, max_size=5))
def test_config_survives_the_environment(replica, ports):
    url = ",".join(f"nats://h{i}.example:{p}" for i, p in enumerate(ports))
    config = BusConfig(url=url, credentials="/run/secrets/nats", tls_ca="/etc/ca.pem", replica=replica)
    assert BusConfig.from_env(config.to_env()) == config
    assert config.servers == url.split(",")


@pytest.mark.parametrize("url, replica, message", [
    ("http://h:4222", "r0", "--bus requires"),
    ("nats://h", "r0", "--bus requires"),
    ("local", "r/0", "replica id requires"),
    ("local", "", "replica id requires"),
])
def test_bad_config_is_refused_naming_the_fault(url, replica, message):
    with pytest.raises(ValueError, match=message):
        BusConfig(url=url, replica=replica)


def test_local_is_the_default_and_needs_no_server(tmp_path):
    assert BusConfig.from_env({}).local
    assert type(open_streams(tmp_path, BusConfig())) is Streams


def test_credentials_file_must_be_private_and_well_formed(tmp_path):
    path = tmp_path / "creds"
    path.write_text("replica\nsecret\n")
    path.chmod(0o644)
    with pytest.raises(BusError, match="requires mode 0600"):
        read_credentials(path)
    path.chmod(0o600)
    assert read_credentials(path) == {"user": "replica", "password": "secret"}
    path.write_text("just-one-line\n")
    with pytest.raises(BusError, match="two lines"):
        read_credentials(path)
    with pytest.raises(BusError, match="missing"):
        read_credentials(tmp_path / "missing")
    path.write_text("-----BEGIN NATS USER JWT-----\nxxx\n------END NATS USER JWT------\n")
    try:
        import nkeys  # noqa: F401
    except ImportError:
        with pytest.raises(BusError, match="requires the nkeys package"):
            read_credentials(path)


def test_shipped_sample_grants_what_the_test_cluster_grants():
    text = SAMPLE.read_text()
    for user, permissions in USERS.items():
        block = text[text.index(f'user: "{user}"'):]
        block = block[: block.index("} } }")]
        for direction, rules in permissions.items():
            for kind, subjects in rules.items():
                for subject in subjects:
                    assert f'"{subject}"' in block, (user, direction, kind, subject)
