"""evaclip-serve: HTTP round trip on 127.0.0.1 (ephemeral port), limits (413/411) and bad input (400)."""
import base64
import http.client
import io
import json
import socket

import numpy as np
import pytest
from PIL import Image

import evaclip_paddle as ec
from evaclip_paddle.export import export_model
from evaclip_paddle.export.serve import make_server, serve_in_thread
from evaclip_paddle.inference import EVACLIPPredictor

MAX_BYTES, MAX_BATCH = 20_000, 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serve_export"))
    export_model(ec.create_model("EVA02-CLIP-tiny", seed=2), out, verify=False)
    pred = EVACLIPPredictor(out, threads=2)
    srv = make_server(pred, port=0, max_bytes=MAX_BYTES, max_batch=MAX_BATCH)
    serve_in_thread(srv)
    yield srv, pred
    srv.shutdown()
    srv.server_close()


def _png(seed, size=(40, 30)):
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, size + (3,), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _post(srv, path, body, ctype):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    data = json.loads(r.read())
    conn.close()
    return r.status, data


def _raw(srv, request: bytes) -> str:
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)  # nothing more will come: the server's drain ends at once
        chunks = []
        while True:  # the server closes after an error response
            c = s.recv(65536)
            if not c:
                return b"".join(chunks).decode("latin-1")
            chunks.append(c)


def test_round_trip(server):
    srv, pred = server
    assert srv.server_address[0] == "127.0.0.1"
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["embed_dim"] == 64 and health["towers"] == ["image", "text"]

    imgs = [_png(0), _png(1, (25, 60))]
    ref = pred.embed_images([Image.open(io.BytesIO(b)) for b in imgs])
    status, data = _post(srv, "/embed/image", imgs[0], "image/png")
    assert status == 200 and data["dim"] == 64 and data["normalized"]
    np.testing.assert_allclose(np.asarray(data["embeddings"]), ref[:1], atol=1e-5)
    body = json.dumps({"images": [base64.b64encode(b).decode() for b in imgs]})
    status, data = _post(srv, "/embed/image", body, "application/json")
    assert status == 200
    np.testing.assert_allclose(np.asarray(data["embeddings"]), ref, atol=1e-5)

    texts = ["a photo of a cat", "a diagram"]
    status, data = _post(srv, "/embed/text?normalize=false", json.dumps({"texts": texts}), "application/json")
    assert status == 200 and not data["normalized"]
    np.testing.assert_allclose(np.asarray(data["embeddings"]), pred.embed_texts(texts, normalize=False), atol=1e-5)


def test_limits_and_bad_input(server):
    srv, _ = server
    # Too large: refused from Content-Length alone, before the body is read.
    resp = _raw(srv, b"POST /embed/image HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
    assert resp.startswith("HTTP/1.0 413") and "exceeds the limit" in resp
    status, data = _post(srv, "/embed/image", b"\0" * (MAX_BYTES + 1), "image/png")
    assert status == 413
    status, data = _post(srv, "/embed/text", json.dumps({"texts": ["a"] * (MAX_BATCH + 1)}), "application/json")
    assert status == 413 and "batch limit" in data["error"]
    resp = _raw(srv, b"POST /embed/text HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.startswith("HTTP/1.0 411")

    cases = [
        ("/embed/image", b"garbage, not an image", "application/octet-stream", "cannot decode image"),
        ("/embed/image", b"", "image/png", "empty body"),
        ("/embed/image", b"{not json", "application/json", "not valid JSON"),
        ("/embed/image", json.dumps({"images": ["%%%"]}).encode(), "application/json", "images[0] is not valid base64"),
        ("/embed/image", json.dumps({"images": [base64.b64encode(b"xx").decode()]}).encode(), "application/json",
         "images[0]: cannot decode image"),
        ("/embed/text", json.dumps({"texts": "not a list"}).encode(), "application/json", "must be a list"),
        ("/embed/text", json.dumps({"texts": ["ok", 3]}).encode(), "application/json", "texts[1] must be a string"),
        ("/embed/text", json.dumps([1, 2]).encode(), "application/json", "must be an object"),
        ("/embed/text", json.dumps({"texts": []}).encode(), "application/json", "is empty"),
    ]
    for path, body, ctype, msg in cases:
        status, data = _post(srv, path, body, ctype)
        assert status == 400 and msg in data["error"], (path, body[:30], status, data)
    status, data = _post(srv, "/embed/audio", b"{}", "application/json")
    assert status == 404
    # The server keeps serving after errors.
    status, _ = _post(srv, "/embed/text", json.dumps({"text": "still alive"}), "application/json")
    assert status == 200
