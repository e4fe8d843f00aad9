"""download.sh end to end against a fake Meta download server on 127.0.0.1: each family's layout, md5
verification (md5sum, and macOS's `md5 -r` through a stand-in), and the failures users hit: an expired URL
(HTTP 403), an HTML page instead of checklist.chk, an md5 mismatch, an interrupted download (resume).

Checksums in the fake tree are computed here with hashlib, independently of the script's md5 tools."""

import hashlib
import http.server
import os
import random
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here runs download.sh in bash
SCRIPT = Path(__file__).resolve().parent.parent / "download.sh"
SHARD_BYTES = 96 * 1024  # big enough that a download can be cut in the middle

# One model per family: (the model name users type, the folder Meta serves it from, its number of shards).
MODELS = {
    "2": ("7B", "llama-2-7b", 1),
    "3": ("70B-instruct", "Meta-Llama-3-70B-Instruct", 8),
    "3.1": ("8B", "Meta-Llama-3.1-8B", 1),
    "3.2": ("3B-instruct", "Llama-3.2-3B-Instruct", 1),
}

# The tool tests use where they do not test a particular one; without wget and curl they skip.
ANY_DOWNLOADER = shutil.which("wget") and "wget" or shutil.which("curl") and "curl"
needs_downloader = pytest.mark.skipif(not ANY_DOWNLOADER, reason="neither wget nor curl is installed")

DOWNLOADERS = [
    pytest.param(tool, marks=pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed"))
    for tool in ("wget", "curl")
]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fake_tree() -> dict:
    """Remote path -> bytes, laid out as Meta serves Llama 2 (one tokenizer at the top) and Llama 3.x
    (a tokenizer in each model folder), each folder with its checklist.chk."""
    rng = random.Random(0)
    files = {"LICENSE": b"license text\n", "USE_POLICY": b"policy\n", "USE_POLICY.md": b"policy\n"}
    files["tokenizer.model"] = rng.randbytes(2048)
    files["tokenizer_checklist.chk"] = f"{md5(files['tokenizer.model'])}  tokenizer.model\n".encode()
    for family, (_, folder, shards) in MODELS.items():
        own = {f"consolidated.{s:02d}.pth": rng.randbytes(SHARD_BYTES) for s in range(shards)}
        own["params.json"] = b'{"dim": 64}\n'
        if family != "2":
            own["tokenizer.model"] = rng.randbytes(2048)
        files[f"{folder}/checklist.chk"] = "".join(f"{md5(d)}  {n}\n" for n, d in own.items()).encode()
        files.update({f"{folder}/{n}": d for n, d in own.items()})
    return files


class FakeMeta(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` for URLs signed with a Policy, honours Range requests, and plays faults:
    server.fault = "expired" (403 for everything), "html_checklist", ("corrupt", path), ("drop", path)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: bytes, headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path).lstrip("/")
        server = self.server
        server.requests.append((path, self.headers.get("Range")))
        if server.fault == "expired" or "Policy=" not in url.query:
            # What CloudFront sends for an expired signature.
            return self._reply(403, b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                                    b"<Message>Access denied</Message></Error>")
        if server.fault == "html_checklist" and path.endswith("checklist.chk"):
            return self._reply(200, b"<!DOCTYPE html><html><body>Your request has expired</body></html>\n",
                               [("Content-Type", "text/html")])
        if path not in server.files:
            return self._reply(404, b"not found")
        body = server.files[path]
        if server.fault == ("corrupt", path):
            body = bytes([body[0] ^ 1]) + body[1:]
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][len("bytes="):].split("-")[0])
        if start >= len(body):
            return self._reply(416, b"", [("Content-Range", f"bytes */{len(body)}")])
        code, headers = 200, []
        if start:
            code, headers = 206, [("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")]
        if server.fault == ("drop", path):
            # Promise the whole body, send half, hang up: the connection breaks mid-file (once).
            server.fault = None
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._reply(code, body[start:], headers)


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeMeta)
    srv.files = fake_tree()
    srv.fault = None
    srv.requests = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fake(server):
    server.fault = None
    server.requests.clear()
    return server


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/*?Policy=eyJTdGF0&Signature=abc~def&Key-Pair-Id=K15"


def run_script(server, target: Path, family: str, models: str, downloader=None, extra_env=None,
               args=None, stdin: str = ""):
    env = dict(os.environ, LLAMA_DOWNLOADER=downloader or ANY_DOWNLOADER or "wget", **(extra_env or {}))
    if args is None:
        args = ["--url", url_of(server), "--family", family, "--models", models, "--target", str(target)]
    return subprocess.run(["bash", str(SCRIPT), *args], input=stdin, env=env, capture_output=True, text=True,
                          timeout=120)


def assert_tree(server, target: Path, family: str) -> None:
    _, folder, _ = MODELS[family]
    wanted = [p for p in server.files if p.startswith(folder + "/")]
    assert wanted
    for path in wanted:
        assert (target / path).read_bytes() == server.files[path], path


@pytest.mark.parametrize("downloader", DOWNLOADERS)
@pytest.mark.parametrize("family", list(MODELS))
def test_each_family_downloads_into_meta_layout_and_verifies(fake, tmp_path, family, downloader):
    model, folder, shards = MODELS[family]
    result = run_script(fake, tmp_path, family, model, downloader)
    assert result.returncode == 0, result.stderr
    assert_tree(fake, tmp_path, family)
    assert f"Verified {shards + 2 - (family == '2')} files in {tmp_path}/{folder}" in result.stdout
    if family == "2":  # one SentencePiece tokenizer for every Llama 2 model, verified on its own
        assert (tmp_path / "tokenizer.model").read_bytes() == fake.files["tokenizer.model"]
        assert f"Verified 1 files in {tmp_path}" in result.stdout
    assert (tmp_path / "LICENSE").is_file()


@needs_downloader
def test_env_vars_and_prompts_work_without_options(fake, tmp_path):
    env = {"LLAMA_URL": url_of(fake), "LLAMA_FAMILY": "3.1", "TARGET_FOLDER": str(tmp_path)}
    result = run_script(fake, tmp_path, "", "", args=[], extra_env=env, stdin="8B\n")
    assert result.returncode == 0, result.stderr
    assert_tree(fake, tmp_path, "3.1")
    # Everything asked on standard input, as Meta's script asks it.
    result = run_script(fake, tmp_path, "", "", args=["--target", str(tmp_path / "asked")],
                        stdin=f"{url_of(fake)}\n3.2\n3B-instruct\n")
    assert result.returncode == 0, result.stderr
    assert_tree(fake, tmp_path / "asked", "3.2")


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_expired_url_403_is_explained(fake, tmp_path, downloader):
    fake.fault = "expired"
    result = run_script(fake, tmp_path, "3", "70B-instruct", downloader)
    assert result.returncode != 0
    assert "HTTP 403 Forbidden for LICENSE" in result.stderr
    assert "expired" in result.stderr
    assert not (tmp_path / "LICENSE").exists()  # no error page or empty file left to "resume"


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_html_page_instead_of_checklist_is_explained_and_removed(fake, tmp_path, downloader):
    fake.fault = "html_checklist"
    result = run_script(fake, tmp_path, "3.1", "8B", downloader)
    assert result.returncode != 0
    assert "checklist.chk is not a list of md5 checksums" in result.stderr
    assert "<!DOCTYPE html>" in result.stderr and "expired" in result.stderr
    assert not (tmp_path / "Meta-Llama-3.1-8B" / "checklist.chk").exists()  # the next run fetches it again


@needs_downloader
@pytest.mark.parametrize("md5_tool", ["md5sum", "md5"])
def test_md5_mismatch_fails_naming_the_file(fake, tmp_path, md5_tool):
    extra_env = {"MD5_TOOL": md5_tool}
    if md5_tool == "md5":
        extra_env["PATH"] = fake_macos_md5(tmp_path / "bin") + os.pathsep + os.environ["PATH"]
    fake.fault = ("corrupt", "Meta-Llama-3-70B-Instruct/consolidated.05.pth")
    result = run_script(fake, tmp_path / "dl", "3", "70B-instruct", extra_env=extra_env)
    assert result.returncode != 0
    folder = tmp_path / "dl" / "Meta-Llama-3-70B-Instruct"
    assert f"md5 MISMATCH: {folder}/consolidated.05.pth" in result.stderr
    assert "MISMATCH: " + f"{folder}/consolidated.04.pth" not in result.stderr
    assert result.stderr.count("MISMATCH") == 1
    assert "verification failed" in result.stderr
    # The same files pass once the good bytes are there: the macOS path verifies too.
    fake.fault = None
    (folder / "consolidated.05.pth").unlink()
    result = run_script(fake, tmp_path / "dl", "3", "70B-instruct", extra_env=extra_env)
    assert result.returncode == 0, result.stderr
    assert f"({md5_tool})" in result.stdout


def fake_macos_md5(bin_dir: Path) -> str:
    """An `md5` that prints what macOS's `md5 -r FILE` prints ("HASH FILE"), computed with Python."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / "md5"
    tool.write_text(
        f"#!{sys.executable}\n"
        "import hashlib, sys\n"
        "assert sys.argv[1] == '-r', sys.argv\n"
        "print(hashlib.md5(open(sys.argv[2], 'rb').read()).hexdigest(), sys.argv[2])\n"
    )
    tool.chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_partial_file_from_an_interrupted_run_resumes(fake, tmp_path, downloader):
    folder = tmp_path / "Meta-Llama-3.1-8B"
    folder.mkdir(parents=True)
    shard = fake.files["Meta-Llama-3.1-8B/consolidated.00.pth"]
    (folder / "consolidated.00.pth").write_bytes(shard[:1000])
    result = run_script(fake, tmp_path, "3.1", "8B", downloader)
    assert result.returncode == 0, result.stderr
    assert ("Meta-Llama-3.1-8B/consolidated.00.pth", "bytes=1000-") in fake.requests
    assert_tree(fake, tmp_path, "3.1")


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_connection_dropped_mid_file_resumes(fake, tmp_path, downloader):
    fake.fault = ("drop", "Meta-Llama-3.1-8B/consolidated.00.pth")
    result = run_script(fake, tmp_path, "3.1", "8B", downloader)
    assert result.returncode == 0, result.stderr
    ranges = [r for p, r in fake.requests if p == "Meta-Llama-3.1-8B/consolidated.00.pth"]
    assert ranges == [None, f"bytes={SHARD_BYTES // 2}-"]  # the second request continues from the cut
    assert_tree(fake, tmp_path, "3.1")


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_rerun_after_success_downloads_nothing_again_and_verifies(fake, tmp_path, downloader):
    assert run_script(fake, tmp_path, "3.2", "3B-instruct", downloader).returncode == 0
    fake.requests.clear()
    result = run_script(fake, tmp_path, "3.2", "3B-instruct", downloader)
    assert result.returncode == 0, result.stderr
    shard_requests = [r for p, r in fake.requests if p.endswith("consolidated.00.pth")]
    assert shard_requests == [f"bytes={SHARD_BYTES}-"]  # only asks for what is past the end
    assert_tree(fake, tmp_path, "3.2")


def test_bad_url_family_and_model_are_refused_before_downloading(fake, tmp_path):
    result = run_script(fake, tmp_path, "3", "8B", args=["--url", "https://example.com/file", "--family", "3",
                                                         "--models", "8B", "--target", str(tmp_path)])
    assert result.returncode != 0 and "contain a '*'" in result.stderr
    result = run_script(fake, tmp_path, "4", "8B")
    assert result.returncode != 0 and "unknown family '4'" in result.stderr
    result = run_script(fake, tmp_path, "3", "9B")
    assert result.returncode != 0 and "unknown model '9B' for Llama 3" in result.stderr
    assert fake.requests == []


@needs_downloader
def test_custom_folder_spec_downloads_an_unlisted_model(fake, tmp_path):
    result = run_script(fake, tmp_path, "3", "Meta-Llama-3.1-8B:1")
    assert result.returncode == 0, result.stderr
    assert_tree(fake, tmp_path, "3.1")
