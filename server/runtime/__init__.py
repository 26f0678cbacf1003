"""What runs inside a Triton Python-backend stub: the ranker and feedback runtimes, the request checks
both share (requests.py, no numba), the fused serving forward, and the adapter between Triton's tensors and them (model_repository/*/1/model.py call in here).
"""
