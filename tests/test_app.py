"""The drawing app: its JSON API (limits, malformed input, load) and the page itself in a real
headless Chromium driven with pointer events."""
from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from dfd_data.image_io import decode_image, encode_png
from dfd_model.projection import FeatureBank
from dfd_model.serve import MAX_BODY_BYTES, make_server
from dfd_model.sketch_to_face import SketchToFace
from tests.hostile import bomb_png


@pytest.fixture(scope="module")
def server(tiny_model_folder):
    """The app on the tiny trained model. Its banks hold only two sketches and its image
    decoders have barely learned, so shadows would hardly change with the sketch: each bank
    gets 40 latents scattered around the real ones and the decoders' last convolution random
    weights, so that neighbours, and therefore shadows, differ visibly between sketches."""
    model = SketchToFace.from_pretrained(tiny_model_folder, device="cpu")
    generator = torch.Generator().manual_seed(0)
    model.set_banks(FeatureBank({
        name: {gender: model.banks.get(name, gender) + 0.3 * torch.randn(40, model.config.latent_dim, generator=generator)
               for gender in model.genders} for name in model.banks.components}))
    with torch.no_grad():
        for autoencoder in model.autoencoders.values():
            autoencoder.decoder.head[1].weight.normal_(0, 0.5, generator=generator)
    httpd = make_server(model, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/api/generate", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()


def _sketch_url(size: int = 128, line: bool = True) -> str:
    sketch = np.full((size, size), 255, np.uint8)
    if line:
        sketch[size // 2, size // 4: 3 * size // 4] = 0
    return _data_url(sketch)


def _image(data_url: str) -> np.ndarray:
    return decode_image(base64.b64decode(data_url.split(",", 1)[1]))


def test_generate_returns_a_face_and_a_shadow(server):
    with urllib.request.urlopen(server + "/api/info") as response:
        info = json.loads(response.read())
    assert info == {"resolution": 128, "genders": ["female", "male"],
                    "components": ["left_eye", "right_eye", "nose", "mouth", "remainder"], "has_banks": True}
    status, answer = _post(server, json.dumps({"sketch": _sketch_url(300), "shadow": True, "gender": "male",
                                               "refine": {"nose": 0.5}}).encode())
    assert status == 200, answer
    assert _image(answer["face"]).shape == (128, 128, 3) and _image(answer["shadow"]).shape == (128, 128, 3)
    status, same = _post(server, json.dumps({"sketch": _sketch_url(300), "shadow": True, "gender": "male",
                                             "refine": {"nose": 0.5}}).encode())
    assert same["face"] == answer["face"]  # deterministic: the same sketch gives the same face


@pytest.mark.parametrize("body, status, message", [
    (b"not json", 400, "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),  # deeper than Python's recursion limit
    (b'{"refine": ' + b"1" * 5000 + b"}", 400, "not valid JSON"),  # an integer past Python's digit limit
    (json.dumps({"sketch": "@@@"}).encode(), 400, "not valid base64"),
    (json.dumps({"sketch": "data:image/png;base64"}).encode(), 400, "without data (no comma)"),
    (json.dumps({"sketch": base64.b64encode(b"<html>hello</html>").decode()}).encode(), 400, "sketch:"),
    (json.dumps({"sketch": base64.b64encode(bomb_png()).decode()}).encode(), 400, "sketch:"),
    (json.dumps({"sketch": _sketch_url(), "refine": 3}).encode(), 400, "refine must be"),
    (json.dumps({"sketch": _sketch_url(), "refine": {"chin": 1}}).encode(), 400, "unknown component"),
    (json.dumps({"sketch": _sketch_url(), "gender": "robot"}).encode(), 400, "gender 'robot'"),
    (json.dumps({"sketch": _sketch_url(), "path": "/etc/passwd"}).encode(), 400, "unknown field 'path'"),
    (json.dumps({"sketch": _data_url(np.zeros((64, 64), np.uint8))}).encode(), 400, "0% of it is white paper"),
])
def test_malformed_requests_get_a_400_with_a_reason(server, body, status, message):
    code, answer = _post(server, body)
    assert code == status and message in answer["error"]


def test_real_photos_are_refused_and_real_artist_sketches_accepted(server, shared_data):
    """A photo sent by mistake gets a 400 that says so, not a face made from its edges."""
    from dfd_data.image_io import read_image

    for photo in [sorted((shared_data / "celebahq").iterdir())[0], sorted((shared_data / "apdrawing").iterdir())[0],
                  sorted((shared_data / "fs2k_train" / "photo" / "photo1").iterdir())[0]]:
        code, answer = _post(server, json.dumps({"sketch": _data_url(read_image(photo))}).encode())
        assert code == 400 and answer["error"].startswith("sketch: looks like"), (photo, answer)
    artist = sorted((shared_data / "fs2k_train" / "sketch" / "sketch1").iterdir())[0]
    code, answer = _post(server, json.dumps({"sketch": _data_url(read_image(artist))}).encode())
    assert code == 200, answer


def test_a_taken_port_is_one_line_before_the_model_loads(server, tmp_path):
    """The port is tried first: a folder that is no model is never read."""
    from click.testing import CliRunner

    from dfd_model.cli import main

    port = server.rsplit(":", 1)[1]
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path), "--port", port])
    assert result.exit_code == 1 and f"cannot serve at 127.0.0.1:{port}:" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_oversized_bodies_and_unknown_paths_are_refused(server):
    request = urllib.request.Request(server + "/api/generate", data=b"x", method="POST",
                                     headers={"Content-Length": str(MAX_BODY_BYTES + 1)})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(server + "/../../etc/passwd", timeout=30)
    assert caught.value.code == 404


def _exchange(server: str, raw: bytes) -> bytes:
    """Send raw bytes on one keep-alive connection; everything the server sends back until it
    closes the connection (or stays quiet for 5 s)."""
    host, port = server.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(raw)
        answer = b""
        with contextlib.suppress(TimeoutError):
            while chunk := connection.recv(65536):
                answer += chunk
    return answer


def _response(connection: socket.socket) -> bytes:
    """One whole response from a keep-alive connection: its head, then as many bytes as its
    Content-Length says (the server sends head and body apart: one recv may get the head alone)."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(65536) or pytest.fail(f"connection closed mid-response: {answer!r}")
    head = answer.split(b"\r\n\r\n", 1)[0]
    length = int(re.search(rb"\r\nContent-Length: (\d+)", head, re.IGNORECASE).group(1))
    while len(answer) < len(head) + 4 + length:
        answer += connection.recv(65536) or pytest.fail(f"connection closed mid-body: {answer!r}")
    return answer


def test_a_refused_request_never_leaves_its_body_to_be_read_as_the_next_request(server):
    """On a keep-alive connection a body left unread would be parsed as the client's next
    request: a refusal sent before reading it must close the connection."""
    smuggled = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for head in (b"POST /api/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(smuggled),
                 b"PUT /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(smuggled),
                 b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"):
        answer = _exchange(server, head + smuggled)
        assert answer.count(b"HTTP/1.1 ") == 1, (head, answer)
        assert b'"resolution"' not in answer
    # a length that str.isdigit() accepts but int() does not is refused, not a server error
    answer = _exchange(server, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\xb2\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 411 ")
    # and a well-formed request still gets its answer on a connection that stays open
    answer = _exchange(server, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 2)
    assert answer.count(b"HTTP/1.1 200 ") == 2


def test_head_options_and_other_methods_get_standard_answers(server):
    """HEAD is GET without the body; OPTIONS and a refused method name the methods allowed."""
    get = _exchange(server, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    head = _exchange(server, b"HEAD /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    headers, body = get.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n") and body
    assert [line for line in head.split(b"\r\n") if line.startswith(b"Content-Length")] == \
        [line for line in headers.split(b"\r\n") if line.startswith(b"Content-Length")]
    options = _exchange(server, b"OPTIONS /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert options.startswith(b"HTTP/1.1 204 ") and b"Allow: POST, OPTIONS\r\n" in options
    delete = _exchange(server, b"DELETE /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert delete.startswith(b"HTTP/1.1 405 ") and b"Allow: POST, OPTIONS\r\n" in delete
    assert delete.endswith(b'{"error": "/api/generate answers POST only"}')


def test_pages_of_other_sites_cannot_drive_the_model(server):
    """A page elsewhere can make the browser POST to 127.0.0.1 (a "simple" cross-site request)
    or point its own name at it (DNS rebinding): neither may reach the model."""
    body = json.dumps({"sketch": _sketch_url()}).encode()
    assert _post(server, body, {"Content-Type": "text/plain"}) == \
        (415, {"error": "the body must be sent as application/json, not text/plain"})
    code, answer = _post(server, body, {"Origin": "http://attacker.example"})
    assert code == 403 and "attacker.example" in answer["error"]
    assert _post(server, body, {"Origin": server})[0] == 200  # the page itself
    port = server.rsplit(":", 1)[1]
    for host in (b"attacker.example", b"attacker.example:" + port.encode()):
        answer = _exchange(server, b"GET /api/info HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host)
        assert answer.startswith(b"HTTP/1.1 403 ") and b"'attacker.example'" in answer
    answer = _exchange(server, b"GET /api/info HTTP/1.1\r\nConnection: close\r\n\r\n")  # no Host at all
    assert answer.startswith(b"HTTP/1.1 400 ") and b"needs a Host header" in answer
    for host in (b"localhost", b"127.0.0.2", b"[::1]", socket.gethostname().encode()):  # names only this machine has
        answer = _exchange(server, b"GET / HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n"
                           % (host, port.encode()))
        assert answer.startswith(b"HTTP/1.1 200 "), host


def test_every_refusal_is_json_and_comes_before_the_body_is_sent(server):
    """Wrong methods on real pages are 405; the standard library's own refusals are JSON; an
    oversized body is refused before the client is invited to upload it (Expect: 100-continue);
    a GET's chunked body is never read as the next request."""
    answer = _exchange(server, b"GET /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ") and b"Allow: POST, OPTIONS\r\n" in answer
    assert answer.endswith(b'{"error": "/api/generate answers POST only"}')
    answer = _exchange(server, b"TRACE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 501 ") and answer.endswith(b'{"error": "Unsupported method (\'TRACE\')"}')
    answer = _exchange(server, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                               b"\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (MAX_BODY_BYTES + 1))
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer
    assert b"Connection: close\r\n" in answer
    answer = _exchange(server, b"PUT /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9\r\n"
                               b"Expect: 100-continue\r\n\r\n")  # a body that is never read is never invited
    assert answer.startswith(b"HTTP/1.1 405 ") and b"100 Continue" not in answer
    answer = _exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 1 and b'"resolution"' not in answer


def test_many_concurrent_requests_are_answered_or_refused_and_the_server_survives(server):
    body = json.dumps({"sketch": _sketch_url()}).encode()
    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = [code for code, _ in pool.map(lambda _: _post(server, body), range(200))]
    assert set(codes) <= {200, 503} and codes.count(200) >= 8
    assert _post(server, body)[0] == 200


def test_a_busy_server_answers_503_before_the_upload_or_after_reading_the_body(tiny_model_folder, monkeypatch):
    """With every place in line taken, a client that asks first (Expect: 100-continue) gets
    503 instead of the invitation to upload; one that sends its body gets 503 once the whole
    body is in (refused unread, a large upload had met a closed connection instead), on a
    connection that stays open for its next request unless the client asked to close it."""
    from dfd_model import serve

    service = serve.FaceService(SketchToFace.from_pretrained(tiny_model_folder, device="cpu"))
    service.free_places = 0
    monkeypatch.setattr(serve, "FaceService", lambda model: service)
    httpd = serve.make_server(service.model, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    body = json.dumps({"sketch": _sketch_url(), "padding": "x" * 100_000}).encode()
    head = (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n" % len(body))
    try:
        started = time.monotonic()
        answer = _exchange(url, head + b"Expect: 100-continue\r\n\r\n")
        assert time.monotonic() - started < 4  # (answered, not waited out: the body never comes)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"100 Continue" not in answer
        assert answer.endswith(b'{"error": "%s"}' % serve.BUSY.encode())
        with socket.create_connection(("127.0.0.1", httpd.server_address[1]), timeout=5) as connection:
            connection.sendall(head + b"\r\n" + body[:50_000])
            connection.settimeout(0.5)
            with pytest.raises(TimeoutError):  # (no answer while the body is still coming)
                connection.recv(1)
            connection.settimeout(5)
            connection.sendall(body[50_000:])
            answer = _response(connection)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"Connection: close" not in answer
            assert answer.endswith(b'{"error": "%s"}' % serve.BUSY.encode())
            connection.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # (the same connection)
            assert _response(connection).startswith(b"HTTP/1.1 200 ")
        answer = _exchange(url, head.replace(b"\r\nContent-Length", b"\r\nConnection: close\r\nContent-Length")
                           + b"\r\n" + body)  # (a client that asks to close is answered so, and closed)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Connection: close\r\n" in answer
    finally:
        httpd.shutdown()
        httpd.server_close()

# ---- the page in a real browser -------------------------------------------------------------------
def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium or chromedriver is not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,900"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_drawing_in_chromium_updates_face_and_shadow(server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(server + "/")
        wait = WebDriverWait(browser, 60)
        face = browser.find_element("id", "face")
        wait.until(lambda _: face.get_attribute("data-seq") != "0")
        blank = face.get_attribute("src")

        def settled(previous_seq: str):
            """Wait for an answer newer than `previous_seq` and for no request to be pending."""
            wait.until(lambda _: face.get_attribute("data-seq") != previous_seq
                       and browser.execute_script("return sequence") == int(face.get_attribute("data-seq")))
            return face.get_attribute("src")

        canvas = browser.find_element("id", "sketch")
        seq = face.get_attribute("data-seq")
        shadow_before = browser.find_element("id", "shadow").get_attribute("src")
        actions = ActionChains(browser)
        actions.move_to_element_with_offset(canvas, -120, -60).click_and_hold()
        for _ in range(12):
            actions.move_by_offset(20, 8)
        actions.release().perform()
        drawn = settled(seq)
        assert drawn != blank
        assert browser.find_element("id", "shadow").get_attribute("src") != shadow_before
        ink = browser.execute_script(
            "const d = context.getImageData(0, 0, 512, 512).data; let n = 0;"
            "for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n;")
        assert ink > 500  # the stroke is on the canvas
        browser.save_screenshot(str(tmp_path / "drawing.png"))

        seq = face.get_attribute("data-seq")
        browser.find_element("id", "undo").click()
        assert settled(seq) == blank  # the sketch is blank again, so is the face
        saved = browser.execute_script(  # what "Save sketch" saves now: made when clicked
            "const link = document.getElementById('save-sketch');"
            "link.onclick({currentTarget: link, preventDefault() {}}); return link.href;")
        assert _image(saved).min() == 255  # blank, like the canvas (it had kept the stroke)

        # ten quick changes while a face is computed: one request at a time, the last one for
        # the latest sketch (every change used to be sent, and the server computed them all)
        seq = face.get_attribute("data-seq")
        browser.execute_script(
            "window.posted = 0; const send = window.fetch;"
            "window.fetch = (url, options) => { if (String(url).includes('generate')) posted += 1;"
            "                                   return send(url, options); };"
            "for (let i = 0; i < 10; i++) {"
            "  context.fillRect(100 + 20 * i, 200, 12, 12); generate(); }")
        settled(seq)
        assert browser.execute_script("return posted") == 2
        assert browser.execute_script("return lastAnswered === JSON.stringify({sketch: sketchDataUrl(), "
                                      "refine: refineValue(), gender: null, shadow: true})")
        browser.execute_script("context.clearRect(0, 0, 512, 512)")
        seq = face.get_attribute("data-seq")
        browser.execute_script("generate()")
        assert settled(seq) == blank

        # a loaded sketch is ink on a transparent page (the shadow shows through), and the same
        # file loads again after a clear
        drawing = np.full((256, 256), 255, np.uint8)
        drawing[100:110, 40:200] = 0
        (tmp_path / "loaded.png").write_bytes(encode_png(drawing))
        count = ("const d = context.getImageData(0, 0, 512, 512).data; let ink = 0, clear = 0;"
                 "for (let i = 3; i < d.length; i += 4) { ink += d[i] > 200; clear += d[i] === 0; }"
                 "return [ink, clear];")
        for _ in range(2):
            seq = face.get_attribute("data-seq")
            browser.find_element("id", "load").send_keys(str(tmp_path / "loaded.png"))
            settled(seq)
            ink, clear = browser.execute_script(count)
            assert 0.8 * 4 * 10 * 160 < ink < 1.2 * 4 * 10 * 160 and clear > 0.9 * (512 * 512 - ink)
            seq = face.get_attribute("data-seq")
            browser.find_element("id", "clear").click()
            settled(seq)  # (the blank sketch's answer in before the next load: else it could settle that load early)
        ActionChains(browser).context_click(canvas).perform()  # the right button does not draw
        assert browser.execute_script(count)[0] == 0

        seq = face.get_attribute("data-seq")
        browser.execute_script(
            "const s = document.getElementById('refine-all'); s.value = 0;"
            "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));")
        assert settled(seq) != blank  # unprojected latents give another face
        seq = face.get_attribute("data-seq")
        shown = browser.execute_script(
            "const s = document.getElementById('refine-nose'); s.value = 0.5;"
            "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));"
            "return document.getElementById('refine-all').nextElementSibling.textContent;")
        assert shown == "mixed"  # ALL no longer claims one value for every component
        settled(seq)
        assert Path(tmp_path / "drawing.png").stat().st_size > 10_000
    finally:
        browser.quit()


def test_shadow_cache_gives_the_same_shadows_and_decodes_each_neighbour_once(tiny_model_folder):
    from dfd_model.shadows import ShadowRenderer, shadow_image

    model = SketchToFace.from_pretrained(tiny_model_folder, device="cpu")
    generator = torch.Generator().manual_seed(1)
    model.set_banks(FeatureBank({name: model.banks.get(name)[:1] + 0.3 * torch.randn(30, 32, generator=generator)
                                 for name in model.banks.components}))
    sketch = torch.full((1, 128, 128), 255, dtype=torch.uint8)
    sketch[0, 50:53, 20:100] = 0
    renderer, decoded = ShadowRenderer(model), []
    for autoencoder in model.autoencoders.values():
        autoencoder.decoder.register_forward_hook(lambda module, args, out: decoded.append(args[0].shape[0]))
    first = renderer.image(sketch)
    count = sum(decoded)
    assert 0 < count <= 5 * model.config.knn  # positive-weight neighbours only
    assert torch.equal(renderer.image(sketch), first) and sum(decoded) == count  # all from the cache
    decoded.clear()
    assert (shadow_image(model, sketch).int() - first.int()).abs().max() <= 1  # float16 cache: within one level


def test_a_face_with_shadows_encodes_the_sketch_once_and_equals_the_face_without(tiny_model_folder):
    from dfd_model.serve import FaceService

    service = FaceService(SketchToFace.from_pretrained(tiny_model_folder, device="cpu"))
    encoded = []
    for autoencoder in service.model.autoencoders.values():
        autoencoder.encoder.register_forward_hook(lambda module, args, out: encoded.append(1))
    request = {"sketch": _sketch_url(), "refine": {"nose": 0.0, "mouth": 0.5}, "gender": "female"}
    plain = service.generate(request)
    assert len(encoded) == 5 and plain["shadow"] is None
    encoded.clear()
    with_shadow = service.generate({**request, "shadow": True})
    assert len(encoded) == 5  # once per component, for the face and the shadow together
    assert with_shadow["face"] == plain["face"]
    assert _image(with_shadow["shadow"]).min() < 255
