"""`evaclip-serve`: a minimal HTTP endpoint returning embeddings from an exported model.

Standard library only (http.server.ThreadingHTTPServer); binds 127.0.0.1 unless told otherwise.

  GET  /health        -> {"status": "ok", "model": ..., "embed_dim": ..., "towers": [...]}
  POST /embed/image   body: raw image bytes (any Content-Type but JSON), or
                      JSON {"images": ["<base64>", ...]} / {"image": "<base64>"}
  POST /embed/text    JSON {"texts": ["...", ...]} / {"text": "..."}
  -> {"model": ..., "dim": D, "normalized": true, "embeddings": [[...], ...]}
  Add ?normalize=false for raw features.

Limits: a body over --max-bytes is refused with 413 before it is read (Content-Length is required:
411 without it); more than --max-batch inputs is 413; malformed input is 400 with a message naming
the offending field or item.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np

from .predictor import KERNELS, KERNELS_HELP

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BATCH = 32
MAX_TEXT_CHARS = 10_000


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class EmbedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, predictor, max_bytes: int = DEFAULT_MAX_BYTES, max_batch: int = DEFAULT_MAX_BATCH,
                 verbose: bool = False):
        self.predictor = predictor
        self.max_bytes, self.max_batch, self.verbose = int(max_bytes), int(max_batch), verbose
        super().__init__(address, EmbedHandler)


class EmbedHandler(BaseHTTPRequestHandler):
    server: EmbedServer
    timeout = 60  # seconds per socket read: a stalled client cannot hold a thread forever
    server_version = "evaclip-serve/1"

    # -- plumbing --------------------------------------------------------------------------------
    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, status: int, obj):
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise HTTPError(411, "chunked bodies are not accepted; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(411, "Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise HTTPError(400, f"bad Content-Length: {length!r}") from None
        if n < 0:
            raise HTTPError(400, f"bad Content-Length: {length!r}")
        if n > self.server.max_bytes:
            raise HTTPError(413, f"request body of {n} bytes exceeds the limit of {self.server.max_bytes} bytes")
        body = self.rfile.read(n)
        self._body_read = True
        if len(body) != n:
            raise HTTPError(400, f"body ended after {len(body)} of {n} bytes")
        return body

    def _drain(self, limit: int = 1 << 20, seconds: float = 1.0):
        """Reads (a bounded part of) a refused body before closing: closing a socket with unread
        data resets it, and the client could lose the 413 it was sent."""
        try:
            self.wfile.flush()
            self.connection.settimeout(seconds)
            while limit > 0:
                chunk = self.rfile.read1(min(65536, limit))
                if not chunk:
                    break
                limit -= len(chunk)
        except OSError:
            pass

    def _json(self, body: bytes):
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"body is not valid JSON ({e})") from None

    def _list_field(self, obj, plural: str, singular: str) -> list:
        if not isinstance(obj, dict):
            raise HTTPError(400, f"JSON body must be an object with '{plural}' (a list) or '{singular}'")
        if plural in obj:
            items = obj[plural]
            if not isinstance(items, list):
                raise HTTPError(400, f"'{plural}' must be a list")
        elif singular in obj:
            items = [obj[singular]]
        else:
            raise HTTPError(400, f"JSON body needs '{plural}' (a list) or '{singular}'")
        if not items:
            raise HTTPError(400, f"'{plural}' is empty")
        if len(items) > self.server.max_batch:
            raise HTTPError(413, f"{len(items)} inputs exceed the batch limit of {self.server.max_batch}")
        return items

    # -- routes ------------------------------------------------------------------------------------
    def do_GET(self):
        path = urlparse(self.path).path
        if path in ("/", "/health"):
            p = self.server.predictor
            self._send(200, {"status": "ok", "model": p.meta.get("model"), "embed_dim": p.embed_dim,
                             "towers": p.towers, "max_batch": self.server.max_batch,
                             "max_bytes": self.server.max_bytes})
        elif path.startswith("/embed/"):
            self._send(405, {"error": f"use POST for {path}"})
        else:
            self._send(404, {"error": f"no route {path} (GET /health, POST /embed/image, POST /embed/text)"})

    def do_POST(self):
        url = urlparse(self.path)
        try:
            if url.path not in ("/embed/image", "/embed/text"):
                raise HTTPError(404, f"no route {url.path} (POST /embed/image or /embed/text)")
            tower = url.path.rsplit("/", 1)[1]
            if tower not in self.server.predictor.towers:
                raise HTTPError(404, f"this export has no {tower} tower")
            q = parse_qs(url.query)
            normalize = q.get("normalize", ["true"])[-1].lower() not in ("false", "0", "no")
            body = self._read_body()
            emb = self._embed_images(body) if tower == "image" else self._embed_texts(body)
            emb = emb if not normalize else emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
            p = self.server.predictor
            self._send(200, {"model": p.meta.get("model"), "dim": int(emb.shape[1]), "normalized": normalize,
                             "embeddings": emb.astype(np.float32).tolist()})
        except HTTPError as e:
            self._send(e.status, {"error": e.message})
            if e.status in (411, 413) and not getattr(self, "_body_read", False):
                self._drain()
        except Exception as e:  # a bug or a model failure: report, keep serving
            self._send(500, {"error": f"{type(e).__name__}: {e}"})

    def _embed_images(self, body: bytes) -> np.ndarray:
        from .preprocess import open_image

        if not body:
            raise HTTPError(400, "empty body: send image bytes or JSON {'images': [base64, ...]}")
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            raw = []
            for i, s in enumerate(self._list_field(self._json(body), "images", "image")):
                if not isinstance(s, str):
                    raise HTTPError(400, f"images[{i}] must be a base64 string")
                if s.startswith("data:") and "," in s:  # data URLs are common from browsers
                    s = s.split(",", 1)[1]
                try:
                    raw.append((f"images[{i}]", base64.b64decode(s, validate=True)))
                except (binascii.Error, ValueError):
                    raise HTTPError(400, f"images[{i}] is not valid base64") from None
        else:
            raw = [("body", body)]
        pred = self.server.predictor
        pixels = []
        for name, b in raw:
            try:
                pixels.append(pred.transform(open_image(b)))
            except Exception as e:
                raise HTTPError(400, f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
        return pred.encode_image(np.stack(pixels), normalize=False)

    def _embed_texts(self, body: bytes) -> np.ndarray:
        texts = self._list_field(self._json(body), "texts", "text")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise HTTPError(400, f"texts[{i}] must be a string")
            if len(t) > MAX_TEXT_CHARS:
                raise HTTPError(413, f"texts[{i}] has {len(t)} characters (limit {MAX_TEXT_CHARS})")
        pred = self.server.predictor
        return pred.encode_text(pred.tokenizer(texts), normalize=False)


def make_server(predictor, host: str = "127.0.0.1", port: int = 0, max_bytes: int = DEFAULT_MAX_BYTES,
                max_batch: int = DEFAULT_MAX_BATCH, verbose: bool = False, warm: bool = True) -> EmbedServer:
    """A bound (not yet serving) server; port 0 picks a free port (server.server_address[1])."""
    if warm:  # build the predictors now: a broken export fails at start, not on the first request
        for t in predictor.towers:
            predictor.tower(t)
    return EmbedServer((host, port), predictor, max_bytes=max_bytes, max_batch=max_batch, verbose=verbose)


def serve_in_thread(server: EmbedServer) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name="evaclip-serve", daemon=True)
    t.start()
    return t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaclip-serve", description="Serve embeddings of an exported EVA-CLIP over HTTP.")
    p.add_argument("--export", required=True, help="export folder written by evaclip-export")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest accepted request body")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most inputs per request")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU math threads (default: OMP_NUM_THREADS if set, else all usable CPUs)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--no-onednn", dest="onednn", action="store_false")
    p.add_argument("--kernels", choices=KERNELS, default="auto", help=KERNELS_HELP)
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from .predictor import EVACLIPPredictor

    pred = EVACLIPPredictor(a.export, device=a.device, threads=a.threads, precision=a.precision, onednn=a.onednn,
                            max_batch=a.max_batch, kernels=a.kernels)
    server = make_server(pred, a.host, a.port, a.max_bytes, a.max_batch, a.verbose)
    host, port = server.server_address[:2]
    print(f"evaclip-serve: {pred.meta.get('model')} on http://{host}:{port} (towers: {', '.join(pred.towers)})",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
