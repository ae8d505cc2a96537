"""The summary mail against a real SMTP server on loopback (aiosmtpd): plain, STARTTLS and implicit TLS with a
certificate generated at test time, login, failures that must not raise, and the settings' refusals."""

from __future__ import annotations

import datetime
import email
import email.policy
import ipaddress
import logging
import os
import socket
import ssl
import struct
import threading
import time
import zlib
from email.message import EmailMessage

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vltune.notify import MailSettings, send_mail, summary_body, summary_subject

USER, PASSWORD = "alice", "s3cret-Pa55"
TABLE = "| method | base | new | HM |\n|---|---|---|---|\n| CoOp | 82.69 | 63.22 | 71.66 |\n| acc < 50 | 1 | 2 | 3 |"


class Recorder:
    """aiosmtpd handler that keeps every accepted message."""

    def __init__(self) -> None:
        self.received: list[dict] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # aiosmtpd's hook name
        self.received.append(
            dict(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content or envelope.content,
                login=session.login_data,
                tls=session.ssl is not None,
            )
        )
        return "250 Message accepted for delivery"


def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False, auth_data=auth_data)


def free_port() -> int:
    # aiosmtpd's Controller connects to its own port during start(), so port 0 cannot be passed to it directly.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrickleServer:
    """A raw TCP server on 127.0.0.1 that answers every connection with an endless multi-line SMTP greeting, one
    byte every ``every_s`` seconds: each read gets a byte well within any socket timeout, so only an overall
    deadline can end the conversation. ``disconnected`` is set once a client has closed its socket."""

    GREETING = b"220-slow.example trickles its greeting\r\n"

    def __init__(self, every_s: float = 0.3) -> None:
        self.every_s = every_s
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connected.set()
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            i = 0
            while not self.stop.is_set():
                try:
                    conn.sendall(self.GREETING[i % len(self.GREETING):][:1])
                except OSError:  # the client closed the connection (EPIPE / ECONNRESET)
                    self.disconnected.set()
                    return
                i += 1
                self.stop.wait(self.every_s)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture
def trickle_server():
    server = TrickleServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def smtp_server():
    """Factory: start an aiosmtpd server on 127.0.0.1 with Controller/SMTP kwargs; every one is stopped after."""
    controllers = []

    def start(**kwargs) -> tuple[Controller, Recorder]:
        handler = Recorder()
        controller = Controller(handler, hostname="127.0.0.1", port=free_port(), ready_timeout=5, **kwargs)
        controller.start()
        controllers.append(controller)
        return controller, handler

    try:
        yield start
    finally:
        for controller in controllers:
            controller.stop()


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for localhost / 127.0.0.1: (cert file, key file)."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_file), str(key_file)


@pytest.fixture
def server_tls(cert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    return ctx


def write_png(path, rgb: tuple[int, int, int], size: int = 4) -> bytes:
    """A minimal valid RGB PNG of one colour; returns its bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return data


def settings_for(controller: Controller, **kw) -> MailSettings:
    base = dict(
        enabled=True,
        host="127.0.0.1",
        port=controller.port,
        security="none",
        sender="runner@example.org",
        to=["me@example.org", "lab@example.org"],
        timeout_s=5,
    )
    return MailSettings(**{**base, **kw})


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


# ---------------------------------------------------------------------------------------------------- plain SMTP


def test_plain_mail_with_table_and_png_attachments(smtp_server, tmp_path):
    controller, handler = smtp_server()
    pngs = {"acc_curve.png": write_png(tmp_path / "acc_curve.png", (255, 0, 0))}
    pngs["hm_bars.png"] = write_png(tmp_path / "hm_bars.png", (0, 0, 255))
    subject = summary_subject("coop_b2n", 8, 1)
    body = summary_body("coop_b2n", TABLE, [])

    ok = send_mail(settings_for(controller), subject, body, [str(tmp_path / n) for n in pngs])

    assert ok is True
    assert len(handler.received) == 1
    got = handler.received[0]
    assert got["mail_from"] == "runner@example.org"
    assert got["rcpt_tos"] == ["me@example.org", "lab@example.org"]
    assert got["login"] is None and got["tls"] is False
    msg = parse(got["content"])
    assert msg["Subject"] == "[vltune] coop_b2n: 8 succeeded, 1 failed"
    assert msg["From"] == "runner@example.org"
    assert msg["To"] == "me@example.org, lab@example.org"
    assert msg["Date"] and msg["Message-ID"].endswith("@example.org>")

    text = msg.get_body(preferencelist=("plain",)).get_content()
    for line in TABLE.splitlines():
        assert line in text.splitlines()
    html = msg.get_body(preferencelist=("html",)).get_content()
    assert "<pre" in html and "| acc &lt; 50 | 1 | 2 | 3 |" in html

    attachments = list(msg.iter_attachments())
    assert sorted(a.get_filename() for a in attachments) == sorted(pngs)
    for a in attachments:
        assert a.get_content_type() == "image/png"
        assert a.get_content() == pngs[a.get_filename()]


def test_missing_attachment_returns_false_and_sends_nothing(smtp_server, tmp_path, caplog):
    controller, handler = smtp_server()
    with caplog.at_level(logging.WARNING, logger="vltune.notify"):
        ok = send_mail(settings_for(controller), "s", "b", [str(tmp_path / "nope.png")])
    assert ok is False
    assert handler.received == []
    assert "nope.png" in caplog.text and f"127.0.0.1:{controller.port}" in caplog.text


def test_disabled_settings_send_nothing(smtp_server):
    controller, handler = smtp_server()
    ok = send_mail(settings_for(controller, enabled=False), "s", "b")
    assert ok is False
    assert handler.received == []


# ---------------------------------------------------------------------------------------------------- TLS


def test_starttls_with_private_ca_and_login(smtp_server, server_tls, cert, monkeypatch, caplog):
    controller, handler = smtp_server(
        tls_context=server_tls, require_starttls=True, authenticator=authenticator, auth_required=True
    )
    monkeypatch.setenv("VLTUNE_SMTP_PASSWORD", PASSWORD)
    settings = settings_for(controller, security="starttls", ca_file=cert[0], user=USER)

    with caplog.at_level(logging.DEBUG):
        ok = send_mail(settings, "starttls", "hello")

    assert ok is True
    assert len(handler.received) == 1
    assert handler.received[0]["tls"] is True and handler.received[0]["login"] == USER.encode()
    assert PASSWORD not in caplog.text


def test_implicit_tls_with_private_ca(smtp_server, server_tls, cert):
    controller, handler = smtp_server(ssl_context=server_tls)
    ok = send_mail(settings_for(controller, security="ssl", ca_file=cert[0]), "smtps", "hello")
    assert ok is True
    assert len(handler.received) == 1
    assert parse(handler.received[0]["content"])["Subject"] == "[vltune] smtps"


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_implicit_tls_with_login_from_password_file(smtp_server, server_tls, cert, tmp_path):
    # aiosmtpd's auth_require_tls only recognises STARTTLS, not a Controller-level (implicit) TLS socket.
    controller, handler = smtp_server(
        ssl_context=server_tls, authenticator=authenticator, auth_required=True, auth_require_tls=False
    )
    pw = tmp_path / "smtp_password"
    pw.write_text(PASSWORD + "\nsecond line ignored\n")
    pw.chmod(0o600)
    settings = settings_for(controller, security="ssl", ca_file=cert[0], user=USER, password_file=str(pw))
    assert send_mail(settings, "smtps login", "hello") is True
    assert handler.received[0]["login"] == USER.encode()


def test_untrusted_certificate_is_refused(smtp_server, server_tls, caplog):
    # Without ca_file the self-signed certificate must fail verification: proof that the client verifies at all.
    controller, handler = smtp_server(ssl_context=server_tls)
    with caplog.at_level(logging.WARNING, logger="vltune.notify"):
        ok = send_mail(settings_for(controller, security="ssl"), "s", "b")
    assert ok is False
    assert handler.received == []
    assert f"127.0.0.1:{controller.port}" in caplog.text and "CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_wrong_password_logs_error_and_returns_false(smtp_server, server_tls, cert, monkeypatch, caplog):
    controller, handler = smtp_server(
        tls_context=server_tls, require_starttls=True, authenticator=authenticator, auth_required=True
    )
    monkeypatch.setenv("VLTUNE_SMTP_PASSWORD", "wrong-guess")
    settings = settings_for(controller, security="starttls", ca_file=cert[0], user=USER)

    with caplog.at_level(logging.DEBUG):
        ok = send_mail(settings, "s", "b")

    assert ok is False
    assert handler.received == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("vltune.notify")]
    assert errors and "535" in errors[0].getMessage() and "VLTUNE_SMTP_PASSWORD" in errors[0].getMessage()
    assert "wrong-guess" not in caplog.text


def test_user_without_password_fails_before_connecting(smtp_server, monkeypatch, caplog):
    controller, handler = smtp_server()
    monkeypatch.delenv("MY_PW", raising=False)
    with caplog.at_level(logging.ERROR, logger="vltune.notify"):
        ok = send_mail(settings_for(controller, user=USER, password_env="MY_PW"), "s", "b")
    assert ok is False
    assert handler.received == []
    assert "MY_PW" in caplog.text and "password_file" in caplog.text


# ---------------------------------------------------------------------------------------------------- server down


def test_server_down_returns_false_with_warning(caplog):
    port = free_port()  # nothing listens there any more
    settings = MailSettings(enabled=True, host="127.0.0.1", port=port, security="none", sender="a@b.c", to="x@y.z")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vltune.notify"):
        ok = send_mail(settings, "s", "b")
    assert ok is False
    assert time.monotonic() - start < settings.timeout_s
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and f"127.0.0.1:{port}" in warnings[0].getMessage()


def test_silent_server_times_out(caplog):
    # Accepts TCP (the kernel completes the handshake) but never greets: the client must give up after timeout_s.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        settings = MailSettings(
            enabled=True, host="127.0.0.1", port=port, security="none", sender="a@b.c", to="x@y.z", timeout_s=0.5
        )
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="vltune.notify"):
            ok = send_mail(settings, "s", "b")
        elapsed = time.monotonic() - start
    assert ok is False
    assert 0.4 < elapsed < 1.5
    assert f"127.0.0.1:{port}" in caplog.text and "timed out" in caplog.text


def test_byte_trickling_server_is_cut_off_at_the_deadline(trickle_server, caplog):
    # timeout_s bounds each read; the server sends a byte every 0.3 s forever, so only deadline_s ends the send.
    settings = MailSettings(enabled=True, host="127.0.0.1", port=trickle_server.port, security="none",
                            sender="a@b.c", to="x@y.z", timeout_s=2, deadline_s=1.0)
    outcome: dict = {}
    sender = threading.Thread(target=lambda: outcome.update(ok=send_mail(settings, "s", "b")), daemon=True)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vltune.notify"):
        sender.start()
        sender.join(10)  # a hung send fails the test instead of hanging it
        elapsed = time.monotonic() - start
    assert not sender.is_alive(), "send_mail still blocked after 10 s"
    assert outcome["ok"] is False and trickle_server.connected.is_set()
    assert 0.9 < elapsed < 1.8
    assert f"127.0.0.1:{trickle_server.port}" in caplog.text and "deadline_s" in caplog.text
    assert trickle_server.disconnected.wait(5)  # the socket was really closed, not left trickling
    assert not [t for t in threading.enumerate() if t.name.startswith("vltune-smtp")]


def test_mail_queue_returns_at_once_and_waits_boundedly(trickle_server, caplog):
    from vltune.notify import MailQueue

    settings = MailSettings(enabled=True, host="127.0.0.1", port=trickle_server.port, security="none",
                            sender="a@b.c", to="x@y.z", timeout_s=2, deadline_s=0.6)
    queue = MailQueue(settings)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vltune.notify"):
        queue.submit("one", "b")
        queue.submit("two", "b")
        assert time.monotonic() - start < 0.2 and queue.pending() == 2
        assert queue.wait(0.2) is False  # a bounded wait, still pending
        assert queue.wait(5) is True  # each send gives up at its deadline
    assert 1.1 < time.monotonic() - start < 3
    assert caplog.text.count(f"127.0.0.1:{trickle_server.port} not sent") == 2


# ---------------------------------------------------------------------------------------------------- settings


def test_from_dict_unknown_key_suggests(tmp_path):
    with pytest.raises(ValueError, match=r"base\[\"mail\"\]\[\"hots\"\].*did you mean 'host'.*valid keys: enabled"):
        MailSettings.from_dict(dict(hots="smtp.example.org"), str(tmp_path))
    with pytest.raises(ValueError, match=r"\[\"final_wait\"\].*did you mean 'final_wait_s'"):
        MailSettings.from_dict(dict(final_wait=5), str(tmp_path))


@pytest.mark.parametrize("key", ["password", "pass", "passwd", "secret", "token", "smtp_password"])
def test_from_dict_refuses_secrets(tmp_path, key):
    with pytest.raises(ValueError) as info:
        MailSettings.from_dict({"enabled": False, key: "hunter2"}, str(tmp_path))
    text = str(info.value)
    assert "never go into configs.py" in text and "password_env" in text and "password_file" in text
    assert "hunter2" not in text


def test_password_file_inside_repo_refused(tmp_path):
    repo = tmp_path / "repo"
    (repo / "secrets").mkdir(parents=True)
    (repo / "secrets" / "pw").write_text("x\n")
    for path in [str(repo / "secrets" / "pw"), "secrets/pw"]:
        with pytest.raises(ValueError, match=r"password_file.*inside the repository"):
            MailSettings.from_dict(dict(password_file=path), str(repo))
    # A link outside the repository that points into it is still inside.
    link = tmp_path / "link_pw"
    link.symlink_to(repo / "secrets" / "pw")
    with pytest.raises(ValueError, match="inside the repository"):
        MailSettings.from_dict(dict(password_file=str(link)), str(repo))


def test_password_file_outside_repo_is_read(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "pw").write_text("  from-file  \nignored\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("VLTUNE_SMTP_PASSWORD", "from-env")
    s = MailSettings.from_dict(dict(password_file="~/pw"), str(repo))
    assert s.password_file == os.path.realpath(home / "pw")
    assert s.password() == "from-file"
    assert MailSettings.from_dict(dict(), str(repo)).password() == "from-env"


def test_from_dict_to_string_and_defaults(tmp_path):
    s = MailSettings.from_dict(
        dict(enabled=True, host="smtp.example.org", user="me@example.org", to="you@x.org"), str(tmp_path)
    )
    assert s.to == ["you@x.org"] and s.from_addr == "me@example.org" and s.port == 465 and s.security == "ssl"
    assert MailSettings.from_dict(None, str(tmp_path)) == MailSettings()


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(to=[]), "to"),
        (dict(host=""), "host"),
        (dict(port=0), "port"),
        (dict(port=70000), "port"),
        (dict(security="tls"), "security"),
        (dict(sender="", user=""), "sender"),
        (dict(timeout_s=0), "timeout_s"),
        (dict(deadline_s=-1), "deadline_s"),
        (dict(final_wait_s="60"), "final_wait_s"),
    ],
)
def test_enabled_settings_validated(change, key):
    good = dict(enabled=True, host="smtp.example.org", sender="a@example.org", to=["b@example.org"])
    MailSettings(**good)  # the base case is valid
    with pytest.raises(ValueError, match=rf'base\["mail"\]\["{key}"\]'):
        MailSettings(**{**good, **change})
    MailSettings(**{**good, **change, "enabled": False})  # disabled settings are not validated


# ---------------------------------------------------------------------------------------------------- summary text


def test_summary_subject_counts():
    assert summary_subject("coop_b2n", 8, 1) == "coop_b2n: 8 succeeded, 1 failed"
    assert summary_subject("suite", 3, 0, skipped=2) == "suite: 3 succeeded, 0 failed, 2 skipped"
    assert summary_subject("suite", 3, 1, skipped=0, cancelled=4) == "suite: 3 succeeded, 1 failed, 4 cancelled"


def test_summary_body_lists_failures_with_log_tail():
    failures = [
        dict(
            job="coop_b2n/digits/seed1",
            status="failed",
            exit_code=1,
            log_tail="Traceback\nRuntimeError: boom",
            folder="output/coop_b2n/digits/seed1",
        ),
        dict(job="coop_b2n/shapes/seed1", status="killed", exit_code=None, log_tail="", folder="output/x"),
    ]
    body = summary_body("coop_b2n (output/minibench)", TABLE, failures)
    lines = body.splitlines()
    assert lines[0] == "coop_b2n (output/minibench)"
    assert all(line in lines for line in TABLE.splitlines())
    assert "No failures." not in body
    fail_at = next(i for i, line in enumerate(lines) if line.startswith("Failures"))
    assert fail_at > lines.index(TABLE.splitlines()[-1])
    assert "* coop_b2n/digits/seed1: failed, exit code 1" in lines
    assert "  folder: output/coop_b2n/digits/seed1" in lines
    assert "    RuntimeError: boom" in lines and "    Traceback" in lines
    assert "* coop_b2n/shapes/seed1: killed, exit code n/a" in lines


def test_summary_body_no_failures():
    body = summary_body("suite", TABLE, [])
    assert "No failures." in body.splitlines()
    assert "Failures" not in body
