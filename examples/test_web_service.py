"""Start a web server inside a throw-away VM and test it from the guest and from the host."""

import pytest

PAGE = b"<h1>hello from the guest</h1>\n"


@pytest.fixture
def web(microvm):
    """A busybox httpd serving one page on the guest's loopback, port 8080."""
    microvm.run("mkdir -p /srv/www", check=True)
    microvm.write_file("/srv/www/index.html", PAGE)
    # Redirect the daemon's output: a background process holding the command's
    # stdout open would keep the command running.
    microvm.run("httpd -p 127.0.0.1:8080 -h /srv/www >/dev/null 2>&1", check=True)
    return microvm


def test_page_from_inside_the_guest(web):
    r = web.run(["wget", "-qO-", "http://127.0.0.1:8080/"], timeout=30, check=True)
    assert r.stdout == PAGE


def test_page_from_the_host(web):
    # vm.tcp() reaches a guest TCP port through vsock: no network device, no port clash.
    with web.tcp(8080) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    status, _, body = response.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.") and b" 200 " in status.split(b"\r\n")[0]
    assert body == PAGE


@pytest.mark.microvm(memory_mib=192)
def test_missing_page_is_a_404(web):
    r = web.run(["wget", "-qO-", "http://127.0.0.1:8080/nope"], timeout=30)
    assert r.exit_code != 0 and b"404" in r.stderr
