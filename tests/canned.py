"""A raw TCP (or TLS) server on 127.0.0.1 that sends exactly the bytes each test scripts, for the lean HTTP clients'
tests (tests/test_leanhttp.py, tests/test_leansync.py; the ``canned`` fixture is in conftest.py)."""
from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

# a scripted answer: bytes to send (or pieces with a pause before each), and whether to close afterwards
Answer = Tuple[Union[bytes, Sequence[Tuple[float, bytes]]], bool]


class CannedServer:
    """``script(n, request)`` -> :data:`Answer` for the n-th request (from 0) this server reads; ``connections``
    counts the connections accepted, ``requests`` holds each request's bytes."""

    def __init__(self, script: Callable[[int, bytes], Answer], tls: Optional[ssl.SSLContext] = None):
        self.script, self.tls = script, tls
        self.requests: List[bytes] = []
        self.connections = 0
        self.closed_by_client = 0  # connections on which the client's end closed
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._open: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _addr = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            while True:
                while b"\r\n\r\n" not in data:
                    got = conn.recv(65536)
                    if not got:
                        with self._lock:
                            self.closed_by_client += 1
                        return
                    data += got
                request, data = data.split(b"\r\n\r\n", 1)
                with self._lock:
                    number = len(self.requests)
                    self.requests.append(request)
                reply, close = self.script(number, request)
                for pause, piece in ([(0.0, reply)] if isinstance(reply, bytes) else reply):
                    time.sleep(pause)
                    conn.sendall(piece)
                if close:
                    return
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()

    def close(self) -> None:
        self._sock.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def self_signed(tmp_path) -> Tuple[str, str]:
    """A key and certificate (PEM files) for 127.0.0.1, made now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    key_file, cert_file = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_file), str(cert_file)
