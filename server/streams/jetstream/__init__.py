"""The NATS JetStream backend of the streams: many serving replicas, one trainer, across hosts.

``JetStreamStreams`` (configured by server.streams.bus.BusConfig) has the interface of the local ``Streams`` (server.streams): the ranker,
feedback model, updater and trainer call the same methods whichever backend ``open_streams``
gave them. The record bytes are those of the local backend (server.streams.deltas, server.streams.records).

    local name  JetStream                    subjects                              writers
    FEATURES    stream MONOLITH_FEATURES     monolith.features.<replica>.<instance> every replica
    FEEDBACK    stream MONOLITH_FEEDBACK     monolith.feedback.<replica>.<instance> every replica
    DELTAS      stream MONOLITH_DELTAS       monolith.deltas                        the trainer only
    SNAPSHOTS   object store monolith_snapshots ("snapshot-<seq:020d>": a tar of the
                snapshot directory) + key-value monolith_pointers["snapshot"] -> the newest
                {"seq", "object", "sha256", "bytes", "position"}  (position: the stream sequence
                of the first DELTAS message after the snapshot)
    CHECKPOINTS stay local: the trainer is one process (trainer.checkpoint)

One module per concept:

    client.py     the names on the bus, the client's event loop thread, retry rules
    streams.py    JetStreamStreams: the connection, stream and bucket setup, the facade
    logs.py       FEATURES / FEEDBACK: framed group-commit writer, follower, reader
    deltas.py     DELTAS: the fenced writer, the reassembling reader, seq -> stream position
    lease.py      the trainer lease (one delta writer at a time)
    snapshots.py  the snapshot object store and its pointer

Durability. Streams are created with ``num_replicas`` (3 on a cluster): a publish is
acknowledged once a quorum (2 of 3) has it; that survives kill -9 of any one server. JetStream
fsyncs in the background (``sync_interval``, default 2 minutes) unless a server runs with
``sync_interval: always``; without it, acknowledged messages written in the last interval can be
lost if a quorum of hosts loses power (or its page cache) at once. See the README's section on
scale-out for what each deployment relies on.

Concurrency: one event loop thread per ``JetStreamStreams`` runs the client; the methods of
these modules are called from other threads and wait on it (``client.Loop.run``).
"""

from server.streams.bus import BusConfig, BusError, FencedError
from server.streams.jetstream.client import DELTA_SUBJECT, STREAM_NAMES
from server.streams.jetstream.logs import frame_records, unframe_records
from server.streams.jetstream.streams import JetStreamStreams

__all__ = ["DELTA_SUBJECT", "STREAM_NAMES", "BusConfig", "BusError", "FencedError", "JetStreamStreams",
           "frame_records", "unframe_records"]
