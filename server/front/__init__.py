"""The trust boundary: validating KServe v2 fronts (HTTP, gRPC, metrics) before tritonserver.

See server/front/validate.py for what a request must satisfy, http.py and
grpc.py for the two protocols, auth.py for API keys.
"""

from server.front.auth import ApiKeyError, api_key_file_from, load_api_key
from server.front.grpc import GrpcFront
from server.front.http import HttpFront, MetricsFront
from server.front.validate import FrontLimits, RequestRejected, check_grpc_infer, check_http_infer

__all__ = ["ApiKeyError", "FrontLimits", "GrpcFront", "HttpFront", "MetricsFront", "RequestRejected",
           "api_key_file_from", "check_grpc_infer", "check_http_infer", "load_api_key"]
