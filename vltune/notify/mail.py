"""The summary mail the runner sends after each task and at the end of a suite (stdlib ``smtplib`` + ``email``).

Mail is optional and never fatal: :func:`send_mail` logs what went wrong and returns ``False``, so a dead SMTP
server cannot cost a finished suite. Credentials never live in ``configs.py`` (upstream SkipTuning keeps
``mail.password`` there, and it ends up committed); the password comes from an environment variable or from a file
outside the repository.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import mimetypes
import os
import smtplib
import socket
import ssl
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from html import escape

logger = logging.getLogger(__name__)

SECURITY_CHOICES = ("ssl", "starttls", "none")
# Keys that would put a secret into configs.py; refused with a pointer to password_env / password_file.
SECRET_KEYS = ("password", "pass", "passwd", "secret", "token")
_SECRET_WORDS = ("password", "passwd", "secret", "token")


def _setting(key: str) -> str:
    return f'base["mail"]["{key}"]'


@dataclass
class MailSettings:
    """Where and how the runner mails its summaries: the ``mail=dict(...)`` entry of ``base`` in ``configs.py``.

    Args:
        enabled: send mail at all; when False nothing is validated and nothing is sent.
        host: SMTP server name, e.g. ``smtp.example.org``.
        port: SMTP server port (465 for implicit TLS, 587 for STARTTLS, 25 for a local relay).
        security: ``"ssl"`` (implicit TLS, SMTPS), ``"starttls"`` (plain connection upgraded to TLS), or ``"none"``
            (no encryption; only for a trusted local relay).
        user: login name; empty means no login.
        sender: the From address; defaults to ``user``.
        to: recipient addresses (one string is accepted for a single address).
        password_env: environment variable holding the password.
        password_file: a file outside the repository holding the password on its first line; ``~`` is expanded.
        ca_file: extra CA bundle to trust, for servers with a private CA.
        timeout_s: socket timeout for every SMTP operation, in seconds.
        deadline_s: the most wall-clock seconds one message may take, connect to quit; a server that answers one
            byte at a time never trips ``timeout_s``, so this is what bounds a send.
        final_wait_s: the most seconds the runner waits, at the end of a suite, for mails still being sent.
        subject_prefix: put before every subject, so mail filters can sort the summaries.
    """

    enabled: bool = field(default=False, metadata={"help": "send mail at all; when False nothing is sent"})
    host: str = field(default="", metadata={"help": "SMTP server name, e.g. smtp.example.org"})
    port: int = field(default=465, metadata={"help": "SMTP server port (465 ssl, 587 starttls, 25 local relay)"})
    security: str = field(
        default="ssl",
        metadata={"help": "'ssl' (implicit TLS), 'starttls', or 'none' (only for a trusted local relay)"},
    )
    user: str = field(default="", metadata={"help": "login name; empty means no login"})
    sender: str = field(default="", metadata={"help": "the From address; defaults to user"})
    to: list[str] = field(default_factory=list, metadata={"help": "recipient addresses"})
    password_env: str = field(
        default="VLTUNE_SMTP_PASSWORD", metadata={"help": "environment variable holding the password"}
    )
    password_file: str = field(
        default="",
        metadata={"help": "file outside the repository holding the password on its first line; '~' is expanded"},
    )
    ca_file: str = field(default="", metadata={"help": "extra CA bundle to trust, for servers with a private CA"})
    timeout_s: float = field(default=20.0, metadata={"help": "socket timeout for every SMTP operation, in seconds"})
    deadline_s: float = field(
        default=60.0, metadata={"help": "the most seconds one message may take, connect to quit"}
    )
    final_wait_s: float = field(
        default=60.0, metadata={"help": "the most seconds the runner waits for its mails at the end of a suite"}
    )
    subject_prefix: str = field(default="[vltune]", metadata={"help": "put before every subject"})

    def __post_init__(self) -> None:
        if isinstance(self.to, str):
            self.to = [self.to]
        elif isinstance(self.to, (list, tuple)):
            self.to = list(self.to)
        else:
            raise ValueError(f"{_setting('to')} must be an address or a list of addresses, got {self.to!r}")
        if not self.enabled:
            return
        if not self.host:
            raise ValueError(f"{_setting('host')} is empty: set it to the SMTP server name, e.g. 'smtp.example.org'")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(
                f"{_setting('port')} = {self.port!r} is not a port number: use an integer in 1..65535 "
                "(465 for security='ssl', 587 for 'starttls', 25 for a local relay)"
            )
        if self.security not in SECURITY_CHOICES:
            raise ValueError(
                f"{_setting('security')} = {self.security!r} is not one of {', '.join(map(repr, SECURITY_CHOICES))}"
            )
        if not self.to or not all(isinstance(a, str) and a.strip() for a in self.to):
            raise ValueError(
                f"{_setting('to')} = {self.to!r} needs at least one recipient address, e.g. to=['you@example.org']"
            )
        if not (self.sender or self.user):
            raise ValueError(
                f"{_setting('sender')} and {_setting('user')} are both empty: set sender to the From address "
                "(or user, which is also used as the From address)"
            )
        for key in ("timeout_s", "deadline_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{_setting(key)} = {value!r} must be a positive number of seconds")
        if isinstance(self.final_wait_s, bool) or not isinstance(self.final_wait_s, (int, float)) or not (
            self.final_wait_s >= 0
        ):
            raise ValueError(
                f"{_setting('final_wait_s')} = {self.final_wait_s!r} must be a number of seconds (0 or more)"
            )

    @property
    def from_addr(self) -> str:
        """The From address: ``sender``, or ``user`` when no sender is set."""
        return self.sender or self.user

    @classmethod
    def from_dict(cls, d: Mapping | None, repo_root: str) -> MailSettings:
        """Build the settings from the ``mail=dict(...)`` entry of ``configs.py``.

        Args:
            d: the entry; None (no entry) gives disabled settings.
            repo_root: the repository root; a ``password_file`` inside it is refused because it would end up
                committed.

        Raises:
            ValueError: an unknown key (with a did-you-mean), a secret in the config, a ``password_file`` inside
                the repository, or an invalid value (see ``__post_init__``).
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f'base["mail"] must be a dict, got {type(d).__name__}')
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key in valid:
                continue
            low = str(key).lower()
            if low in SECRET_KEYS or any(word in low for word in _SECRET_WORDS):
                # Do not echo the value: it is the secret.
                raise ValueError(
                    f"{_setting(key)}: secrets never go into configs.py (it is committed). Put the password in an "
                    f"environment variable named by password_env (default {cls.password_env!r}) or in a file "
                    "outside the repository named by password_file"
                )
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown mail setting {_setting(key)}; {hint}valid keys: {', '.join(valid)}")
        kwargs = dict(d)
        if kwargs.get("password_file"):
            kwargs["password_file"] = _outside_repo(str(kwargs["password_file"]), repo_root)
        return cls(**kwargs)

    def password(self) -> str:
        """The login password: the first line of ``password_file`` if set, else the ``password_env`` variable.

        Returns an empty string when neither holds one.

        Raises:
            OSError: ``password_file`` is set but cannot be read.
        """
        if self.password_file:
            path = os.path.expanduser(self.password_file)
            mode = os.stat(path).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                logger.warning("password_file %s is readable by others; chmod 600 it", path)
            with open(path, encoding="utf-8") as f:
                return f.readline().strip()
        return os.environ.get(self.password_env, "")


def _outside_repo(path: str, repo_root: str) -> str:
    """Expand ``~``, resolve ``path`` (relative to ``repo_root``) and refuse it if it lies inside the repository."""
    root = os.path.realpath(repo_root)
    real = os.path.realpath(os.path.join(root, os.path.expanduser(path)))
    if os.path.commonpath([real, root]) == root:
        raise ValueError(
            f"{_setting('password_file')} = {path!r} resolves to {real}, inside the repository ({root}), where it "
            "would end up committed: move the file outside the repository (e.g. ~/.config/vltune/smtp_password) "
            "or use password_env"
        )
    return real


def summary_subject(task_or_suite: str, succeeded: int, failed: int, skipped: int = 0, cancelled: int = 0) -> str:
    """A subject with the counts first-class, e.g. ``"coop_b2n: 8 succeeded, 1 failed"``.

    Skipped and cancelled counts appear only when non-zero.
    """
    parts = [f"{succeeded} succeeded", f"{failed} failed"]
    if skipped:
        parts.append(f"{skipped} skipped")
    if cancelled:
        parts.append(f"{cancelled} cancelled")
    return f"{task_or_suite}: {', '.join(parts)}"


def summary_body(title: str, tables_markdown: str, failures: Sequence[Mapping]) -> str:
    """A plain-text mail body: the title, the markdown tables as they are, then the failures with their log tails.

    Args:
        title: the first line, e.g. the task or suite name and the output folder.
        tables_markdown: result tables (markdown); kept verbatim so columns stay aligned in a monospace font.
        failures: one dict per failed job with ``job``, ``status``, ``exit_code`` (None when the process never
            exited by itself), ``log_tail`` and ``folder``.
    """
    lines = [title, "=" * len(title), ""]
    lines += [tables_markdown.rstrip() if tables_markdown.strip() else "(no result tables)", ""]
    if not failures:
        lines.append("No failures.")
        return "\n".join(lines) + "\n"
    lines += [f"Failures ({len(failures)})", "-" * len(f"Failures ({len(failures)})")]
    for fail in failures:
        code = fail.get("exit_code")
        lines.append(
            f"* {fail.get('job', '?')}: {fail.get('status', '?')}, exit code {'n/a' if code is None else code}"
        )
        if fail.get("folder"):
            lines.append(f"  folder: {fail['folder']}")
        tail = str(fail.get("log_tail") or "").rstrip()
        if tail:
            lines.append("  log tail:")
            lines += ["    " + line for line in tail.splitlines()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def build_message(settings: MailSettings, subject: str, body: str, attachments: Sequence[str] = ()) -> EmailMessage:
    """The message :func:`send_mail` sends: plain text, an HTML ``<pre>`` alternative, and the attachments.

    The HTML part exists because many mail clients render plain text in a proportional font, which breaks the
    alignment of markdown tables; ``<pre>`` keeps them monospaced.

    Raises:
        OSError: an attachment cannot be read.
    """
    msg = EmailMessage()
    # Header values may not contain line breaks; a task name should not be able to break the mail.
    msg["Subject"] = " ".join(f"{settings.subject_prefix} {subject}".split())
    msg["From"] = settings.from_addr
    msg["To"] = ", ".join(settings.to)
    msg["Date"] = formatdate(localtime=True)
    # An explicit domain: make_msgid() would otherwise call socket.getfqdn(), which can block on DNS.
    domain = settings.from_addr.rpartition("@")[2] or "vltune.localdomain"
    msg["Message-ID"] = make_msgid(domain=domain)
    msg.set_content(body)
    msg.add_alternative(
        f'<html><body><pre style="font-family: monospace">{escape(body)}</pre></body></html>\n', subtype="html"
    )
    for path in attachments:
        ctype, encoding = mimetypes.guess_type(path)
        if ctype is None or encoding is not None:  # unknown, or compressed (.gz): send the bytes as they are
            ctype = "application/octet-stream"
        maintype, subtype = ctype.split("/", 1)
        with open(path, "rb") as f:
            data = f.read()
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=os.path.basename(path))
    return msg


def send_mail(settings: MailSettings, subject: str, body: str, attachments: Sequence[str] = ()) -> bool:
    """Send one mail; return True on success.

    Never raises: a refused connection, a timeout, a TLS or login error or a missing attachment is logged (with
    ``host:port`` and the reason) and gives False, because a notification must not fail a suite. Returns False
    without connecting when mail is not enabled. Returns within ``settings.deadline_s`` (plus building the
    message), however slowly the server answers.

    Args:
        settings: server, security, login and recipients.
        subject: put after ``settings.subject_prefix``.
        body: plain text (markdown tables as they are); also sent as an HTML ``<pre>`` alternative.
        attachments: file paths, attached with their MIME type and base name.
    """
    if not settings.enabled:
        logger.debug("mail disabled; not sending %r", subject)
        return False
    where = f"{settings.host}:{settings.port}"
    try:
        msg = build_message(settings, subject, body, attachments)
    except Exception as e:  # a notification must never raise: a missing attachment, a malformed address
        logger.error("mail to %s not sent: cannot build the message: %s", where, e)
        return False
    password = ""
    if settings.user:
        try:
            password = settings.password()
        except OSError as e:
            logger.error("mail to %s not sent: cannot read password_file %s: %s", where, settings.password_file, e)
            return False
        if not password:
            source = (
                f"password_file {settings.password_file}"
                if settings.password_file
                else f"environment variable {settings.password_env}"
            )
            logger.error(
                "mail to %s not sent: user %r is set but no password was found in %s; set the environment "
                "variable named by password_env (%s) or password_file (a file outside the repository)",
                where,
                settings.user,
                source,
                settings.password_env,
            )
            return False
    return _Session(settings, msg, password, where).deliver()


class MailQueue:
    """Sends mails one after another on a daemon worker thread, so that the caller (the runner's scheduler loop)
    never waits for an SMTP server; each send is bounded by ``settings.deadline_s`` (see :func:`send_mail`).

    ``submit`` returns at once; ``wait`` gives the end of a run a bounded wait for what is still queued.
    """

    def __init__(self, settings: MailSettings) -> None:
        self.settings = settings
        self._items: list[tuple[str, str, list[str]]] = []
        self._pending = 0  # queued plus the one being sent
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def submit(self, subject: str, body: str, attachments: Sequence[str] = ()) -> None:
        """Queue one mail; nothing happens when mail is not enabled."""
        if not self.settings.enabled:
            return
        with self._cond:
            self._items.append((subject, body, list(attachments)))
            self._pending += 1
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="vltune-mail", daemon=True)
                self._worker.start()
            self._cond.notify_all()

    def pending(self) -> int:
        """Mails submitted and not yet sent or given up."""
        with self._cond:
            return self._pending

    def wait(self, timeout_s: float, stop: threading.Event | None = None) -> bool:
        """Wait until every submitted mail is sent or given up, at most ``timeout_s`` seconds, or until ``stop`` is
        set; True when nothing is left pending."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return False
                self._cond.wait(min(left, 0.05))  # short: a signal handler sets `stop` without notifying
            return True

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                subject, body, attachments = self._items.pop(0)
            try:
                send_mail(self.settings, subject, body, attachments)
            except BaseException as e:  # noqa: BLE001  (send_mail does not raise; the worker must outlive a bug)
                logger.error("mail to %s not sent: unexpected %s: %s", self.where, type(e).__name__, e)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()


class _TrackedSMTP(smtplib.SMTP):
    """``smtplib.SMTP`` that hands every socket it opens to the session of the calling thread, so that a deadline
    can close it from outside (``smtplib`` only knows per-read timeouts)."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)
        session = getattr(_current, "session", None)
        if session is not None:
            session.track(self, sock)
        return sock


class _TrackedSMTP_SSL(smtplib.SMTP_SSL, _TrackedSMTP):  # MRO: SMTP_SSL wraps the socket _TrackedSMTP tracked
    """``smtplib.SMTP_SSL`` with the socket tracking of :class:`_TrackedSMTP`."""


_current = threading.local()


class _Session:
    """One SMTP conversation (connect, TLS, login, send, quit) run on a daemon thread under a wall-clock deadline.

    ``timeout_s`` bounds each socket read, so a server that sends a byte every few seconds would hold a plain
    ``smtplib`` call for hours. :meth:`deliver` waits at most ``deadline_s``; past it, the session's sockets are
    shut down (the blocked read then fails and the thread ends) and the thread is abandoned if it still does not
    end (e.g. stuck in a TLS handshake on a detached socket; it is a daemon and dies with the process).
    """

    def __init__(self, settings: MailSettings, msg: EmailMessage, password: str, where: str) -> None:
        self.settings, self.msg, self.password, self.where = settings, msg, password, where
        self.ok = False
        self._lock = threading.Lock()
        self._finished = False
        self._abandoned = False
        self._sockets: list[socket.socket] = []
        self._smtp: smtplib.SMTP | None = None

    def deliver(self) -> bool:
        """Run the conversation; True when the server accepted the mail within the deadline."""
        thread = threading.Thread(target=self._run, name=f"vltune-smtp {self.where}", daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(self.settings.deadline_s)
        with self._lock:
            if self._finished:
                return self.ok
            self._abandoned = True
            sockets = [*self._sockets, *([self._smtp.sock] if self._smtp and self._smtp.sock else [])]
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed, or detached by a TLS wrap
        logger.warning(
            "mail to %s not sent: no complete answer within deadline_s = %g s (gave up after %.1f s)",
            self.where,
            self.settings.deadline_s,
            time.monotonic() - started,
        )
        return False

    def track(self, smtp: smtplib.SMTP, sock: socket.socket) -> None:
        with self._lock:
            self._smtp = smtp
            self._sockets.append(sock)

    def _run(self) -> None:
        _current.session = self
        try:
            ok = self._converse()
        except BaseException as e:  # noqa: BLE001  (a notification must never raise, not even on its own thread)
            ok = False
            self._log(logging.ERROR, "mail to %s not sent: unexpected %s: %s", self.where, type(e).__name__, e)
        with self._lock:
            self.ok, self._finished = ok, True

    def _log(self, level: int, fmt: str, *args: object) -> None:
        """Log, unless :meth:`deliver` has given up on this session (it has logged why; the rest is noise)."""
        with self._lock:
            if self._abandoned:
                return
        logger.log(level, fmt, *args)

    def _converse(self) -> bool:
        settings, msg, where = self.settings, self.msg, self.where
        try:
            context = None
            if settings.security in ("ssl", "starttls"):
                context = ssl.create_default_context(cafile=settings.ca_file or None)
            # The constructors connect. The host must be given to them (not to a later connect()): it is the name the
            # certificate is checked against, for SMTP_SSL and for starttls().
            if settings.security == "ssl":
                smtp = _TrackedSMTP_SSL(settings.host, settings.port, timeout=settings.timeout_s, context=context)
            else:
                smtp = _TrackedSMTP(settings.host, settings.port, timeout=settings.timeout_s)
            # try/finally rather than `with smtp`: its __exit__ sends QUIT even after a timeout, which would wait a
            # second timeout_s on a hung server.
            try:
                if settings.security == "starttls":
                    smtp.starttls(context=context)
                if settings.user:
                    smtp.login(settings.user, self.password)
                refused = smtp.send_message(msg, from_addr=settings.from_addr, to_addrs=settings.to)
                try:
                    smtp.quit()
                except (OSError, smtplib.SMTPException):
                    pass  # the server has accepted the mail; a failed goodbye changes nothing
            finally:
                smtp.close()
        except smtplib.SMTPAuthenticationError as e:
            source = f"password_file {settings.password_file}" if settings.password_file else settings.password_env
            self._log(
                logging.ERROR,
                "mail to %s not sent: login as %r refused (%s %s); check the password in %s",
                where,
                settings.user,
                e.smtp_code,
                _decode(e.smtp_error),
                source,
            )
            return False
        except smtplib.SMTPRecipientsRefused as e:
            self._log(
                logging.ERROR, "mail to %s not sent: every recipient was refused: %s", where, _refusals(e.recipients)
            )
            return False
        except (OSError, smtplib.SMTPException) as e:  # refused, timeout, TLS (ssl.SSLError is an OSError), protocol
            self._log(
                logging.WARNING, "mail to %s not sent: %s: %s", where, type(e).__name__, e or "no reason given"
            )
            return False
        except Exception as e:  # a notification must never raise
            self._log(logging.ERROR, "mail to %s not sent: unexpected %s: %s", where, type(e).__name__, e)
            return False
        if refused:
            self._log(logging.WARNING, "mail to %s: some recipients were refused: %s", where, _refusals(refused))
        self._log(logging.INFO, "mail %r sent to %s via %s", msg["Subject"], ", ".join(settings.to), where)
        return True


def _decode(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _refusals(recipients: Mapping[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{addr} ({code} {_decode(err)})" for addr, (code, err) in recipients.items())
