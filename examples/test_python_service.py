"""A Python web service in the guest, built from distro packages, tested from the host.

The marker asks for an image whose root holds Debian's python3 (with its dependencies,
from the host's apt; built once and cached). The service under test comes in as a file;
a real project would share its source directory instead (``shares={"/src": ...}``).
"""

import json

import pytest

pytestmark = pytest.mark.microvm(packages=("python3",), memory_mib=384)

SERVICE = b"""
import json, sqlite3
from http.server import BaseHTTPRequestHandler, HTTPServer

db = sqlite3.connect(":memory:", check_same_thread=False)
db.execute("create table notes(text)")


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        text = self.rfile.read(int(self.headers["Content-Length"])).decode()
        db.execute("insert into notes values (?)", (text,))
        self.send_response(201)
        self.end_headers()

    def do_GET(self):
        body = json.dumps([row[0] for row in db.execute("select text from notes")]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer(("127.0.0.1", 8000), Handler).serve_forever()
"""


@pytest.fixture
def service(microvm):
    microvm.write_file("/srv/notes.py", SERVICE)
    # Output redirected: a background process holding stdout open would keep the command running.
    microvm.run("python3 /srv/notes.py >/var/log/notes.log 2>&1 &", check=True)
    return microvm


def request(vm, raw: bytes) -> tuple[bytes, bytes]:
    # vm.tcp() reaches the guest's loopback through vsock, retrying while the service starts.
    with vm.tcp(8000, timeout=60) as sock:
        sock.sendall(raw)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


def test_notes_round_trip(service):
    status, _ = request(service, b"POST /notes HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")
    assert b" 201 " in status
    status, body = request(service, b"GET /notes HTTP/1.0\r\n\r\n")
    assert b" 200 " in status and json.loads(body) == ["hello"]


def test_the_guest_runs_debians_python(microvm):
    r = microvm.run(["python3", "-c", "import sys; print(sys.version_info[:2] >= (3, 9))"], check=True)
    assert r.stdout == b"True\n"
