"""The streams by name: each name here is the one place a stream is named (server.streams)."""

FEATURES = "feature_log"
FEEDBACK = "feedback_log"
DELTAS = "deltas"
SNAPSHOTS = "snapshots"
CHECKPOINTS = "trainer"
LOGS = (FEATURES, FEEDBACK)  # the streams with one log per serving instance
