"""The Triton stubs run without torch: a fresh interpreter loads both model.py adapters, then a shared
ranker instance starts from a snapshot, applies a sparse and a dense delta, scores and writes its serving
snapshot, and feedback appends an action; torch is never imported (it cost each stub ~200 MB and ~2 s).
Nor is it imported anywhere in server/, updater/ or model_repository/, not even inside a function."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import importlib.util, json, os, sys, time, types
from pathlib import Path

import numpy as np

def torch_modules():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchgen", "functorch"))


sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")  # Triton's stub only
root, data, shm = (Path(p) for p in sys.argv[1:4])
for model in ("ranker", "feedback"):
    path = root / "model_repository" / model / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"{model}_model", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(json.dumps({"torch_after_import": torch_modules()}), flush=True)

from server.dense import initial_dense_state
from server.features import PAD_FID, shipped_schema
from server.runtime.feedback import FeedbackRuntime, parse_feedback_request
from server.runtime.ranker import RankRequest
from server.runtime.shared_ranker import SharedRankerRuntime
from server.streams.delta_log import FileDeltaWriter
from server.streams.deltas import DeltaRecord
from server.streams.snapshots import write_snapshot
from server.table import EmbeddingTable
from updater.applier import DeltaApplier

schema = shipped_schema()
user, items = schema.encode_request({"user_id": 5, "hour": 7}, [{"item_id": i} for i in range(4)])
fids = np.unique(np.concatenate([user, items.ravel()]))
fids = fids[fids != PAD_FID]
rows = np.full((fids.shape[0], schema.dim), 0.1, np.float32)
table = EmbeddingTable(schema.dim)
table.upsert(fids, rows, now=1.0)
write_snapshot(data, table, initial_dense_state(schema.num_fields, schema.dim, schema.dense), 1)
with FileDeltaWriter(data / "deltas") as deltas:
    deltas.append(DeltaRecord.sparse(1, time.time(), fids[:1], rows[:1]))  # in the snapshot: skipped
    deltas.append(DeltaRecord.sparse(2, time.time(), fids, rows * 2))
    deltas.append(DeltaRecord.dense(3, time.time(), initial_dense_state(schema.num_fields, schema.dim,
                                                                        {**schema.dense, "seed": 9})))
ranker = SharedRankerRuntime(schema, data, "ranker_0", make_applier=DeltaApplier.following,
                             server_pid=os.getpid(), shm_root=shm)
scores, seq = ranker.score([RankRequest(b"r", time.time(), user, items)])
written = ranker.close()
feedback = FeedbackRuntime(data, "feedback_0")
durable = feedback.append(parse_feedback_request({"request_id": np.array([b"r"], dtype=object),
                                                  "item_fids": items[:1, 0].copy(),
                                                  "labels": np.ones(1, np.float32)}, time.time()))
feedback.close()
print(json.dumps({"seq": seq, "scores": scores[0].tolist(), "snapshot": written is not None, "durable": durable,
                  "torch": torch_modules()}))
"""


def test_the_stub_runtimes_run_without_importing_torch(tmp_path):
    (tmp_path / "shm").mkdir()
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path / "data"), str(tmp_path / "shm")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = done.stdout.splitlines()
    imported = json.loads(lines[0])["torch_after_import"] if lines else None
    assert imported == [], f"loading the model.py adapters imported {imported[:5] if imported else done.stderr[-3000:]}"
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["seq"] == 3 and len(result["scores"]) == 4 and result["snapshot"] and result["durable"]
    assert result["torch"] == [], f"serving imported {result['torch'][:5]}"


def test_no_module_below_the_trainer_imports_torch():
    found = []
    for package in ("server", "updater", "model_repository"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "torch"]
    assert found == [], f"torch imported by serving code: {found}"


FEEDBACK_ONLY = r"""
import importlib.util, json, sys, time, types
from pathlib import Path

import numpy as np

sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")  # Triton's stub only
root, data = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("feedback_model", root / "model_repository" / "feedback" / "1" / "model.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from server.runtime.feedback import FeedbackRuntime, parse_feedback_request
from server.features import fid

feedback = FeedbackRuntime(data, "feedback_0")
durable = feedback.append(parse_feedback_request({"request_id": np.array([b"r"], dtype=object),
                                                  "item_fids": np.array([fid(3, 7)], np.uint64),
                                                  "labels": np.ones(1, np.float32)}, time.time()))
feedback.close()
print(json.dumps({"durable": durable, "jit": sorted(m for m in sys.modules if m.split(".")[0] in ("numba", "llvmlite"))[:5]}))
"""


def test_the_feedback_stub_runs_without_numba(tmp_path):
    """numba's JIT and LLVM cost a process about 60 MB; the feedback stub parses and appends clicks and needs
    neither (its validation lives in server.runtime.requests, not in the ranker's module)."""
    done = subprocess.run([sys.executable, "-c", FEEDBACK_ONLY, str(ROOT), str(tmp_path / "data")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"durable": True, "jit": []}, result
