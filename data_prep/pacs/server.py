"""One description of a DICOM server, and one connection interface over DICOMweb and DIMSE.

Server strings (what ``medimb-prep pull SERVER`` and ``--push SERVER`` take)::

    dicomweb+http://HOST:PORT/dicom-web        DICOMweb (QIDO-RS, WADO-RS, STOW-RS); also dicomweb+https://
    dimse://CALLED_AET@HOST:PORT               DIMSE (C-ECHO, C-FIND, C-GET, C-STORE)
    dimse://CALLED_AET@HOST:PORT?calling=MEDIMB&retrieve=move&move_dest=MEDIMB&store_port=11113

DIMSE query parameters: ``calling`` (our AE title, default ``MEDIMB``); ``retrieve`` = ``get`` (default:
C-GET, the images come back on our own association, no inbound port needed) or ``move`` (C-MOVE: the
server sends them to ``move_dest``, an AE title the PACS administrator registered with our host and
``store_port``; we listen there while the move runs; ``move_dest`` defaults to ``calling``; giving
``move_dest`` or ``store_port`` selects ``move``); ``store_bind`` (address the storage SCP listens on,
default all interfaces); ``timeout`` (seconds, default 30).

Credentials never go in the server string (a command line is visible to other users in ``ps``).
They come from, in this order: a credentials file given by the caller (``--credentials-file``); the
environment (``MEDIMB_PACS_USER`` + ``MEDIMB_PACS_PASSWORD``, or ``MEDIMB_PACS_TOKEN`` for a bearer
token); a file named by ``MEDIMB_PACS_CREDENTIALS_FILE``. A file holds JSON ``{"user": ..., "password":
...}`` or ``{"token": ...}``, or one line ``user:password``. DICOMweb sends them as HTTP basic
authentication (or ``Authorization: Bearer``); DIMSE as user identity negotiation (username and
passcode), which servers that do not check it ignore. Credentials are never logged or printed.

Usage (the interface other modules rely on; keep it stable)::

    spec = parse_server("dimse://ORTHANC@127.0.0.1:4242", credentials=load_credentials())
    with open_server(spec) as server:          # DicomWebServer or DimseServer
        server.echo()
        studies = server.find_studies({"ModalitiesInStudy": "MR", "StudyDate": "20240101-20241231"})
        refs = server.find_instances(study_uid)           # [InstanceRef(study, series, sop, sop_class)]
        server.retrieve(study_uid, series_uid, on_instance=callback)   # callback(pydicom.Dataset)
        server.store([ds1, ds2])                          # STOW-RS or C-STORE

Every failure is a :class:`PacsError` (a :class:`data_prep.cli.UserError`: one line, no traceback)
with a ``kind``: ``unreachable``, ``refused`` (association rejected: wrong AE title, unknown calling AE),
``auth`` (authentication failed), ``unknown_study``, ``failed`` (the server answered with an error).
Messages name the server by :meth:`ServerSpec.display` and studies by :func:`study_label` (a hash:
UIDs are identifiers and stay out of logs and errors).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

from data_prep.cli import UserError

log = logging.getLogger("data_prep.pacs")

USER_ENV = "MEDIMB_PACS_USER"
PASSWORD_ENV = "MEDIMB_PACS_PASSWORD"
TOKEN_ENV = "MEDIMB_PACS_TOKEN"
CREDENTIALS_FILE_ENV = "MEDIMB_PACS_CREDENTIALS_FILE"
DEFAULT_CALLING_AET = "MEDIMB"
DEFAULT_TIMEOUT_S = 30.0
#: results asked for per QIDO-RS request (the next page follows while a page comes back full)
QIDO_PAGE = 1000
#: the study attributes :meth:`find_studies` returns (keyword -> str), whichever the protocol
STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "StudyDescription", "ModalitiesInStudy",
                "NumberOfStudyRelatedInstances")
_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 1-16 printable ASCII characters, no backslash


class PacsError(UserError):
    """A server problem, reported as one line. ``kind``: unreachable | refused | auth | unknown_study |
    failed | usage."""

    def __init__(self, message: str, kind: str = "failed"):
        super().__init__(message)
        self.kind = kind


def study_label(study_uid: str) -> str:
    """A StudyInstanceUID's name in messages and folders: 16 hex digits of its SHA-256 (not PHI)."""
    return uid_hash(study_uid)


def uid_hash(uid: str, digits: int = 16) -> str:
    """Hex SHA-256 prefix of a UID: names files and folders without putting the UID in them."""
    return hashlib.sha256(str(uid).strip().encode("ascii", "replace")).hexdigest()[:digits]


# ----------------------------------------------------------------------------------------- credentials
@dataclass(frozen=True)
class Credentials:
    """User/password or a bearer token. ``repr`` and ``str`` never show the secret."""

    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    source: str = ""  # where they came from (an env var name or a file path), for messages

    def __str__(self) -> str:
        who = f"user {self.user!r}" if self.user else "a bearer token"
        return f"{who} from {self.source}" if self.source else who


def _credentials_from_file(path: str | os.PathLike) -> Credentials:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8").strip()
        mode = p.stat().st_mode
    except OSError as exc:
        raise PacsError(f"cannot read the credentials file {p}: {exc.strerror or exc}", "usage") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the credentials file %s can be read by other users; chmod 600 it", p)
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise PacsError(f"the credentials file {p} is not valid JSON", "usage") from None
        if not isinstance(data, dict):
            raise PacsError(f"the credentials file {p} must hold a JSON object", "usage")
        creds = Credentials(str(data.get("user", "")), str(data.get("password", "")), str(data.get("token", "")),
                            str(p))
    else:
        user, sep, password = text.splitlines()[0].partition(":") if text else ("", "", "")
        if not sep:
            raise PacsError(f"the credentials file {p} must hold 'user:password' or JSON "
                            '{"user": ..., "password": ...} / {"token": ...}', "usage")
        creds = Credentials(user, password, "", str(p))
    if not (creds.user or creds.token):
        raise PacsError(f"the credentials file {p} holds neither a user nor a token", "usage")
    return creds


def load_credentials(path: str | os.PathLike | None = None, env=None) -> Credentials | None:
    """Credentials from ``path``, else the environment, else ``$MEDIMB_PACS_CREDENTIALS_FILE``; None if none."""
    env = os.environ if env is None else env
    if path:
        return _credentials_from_file(path)
    if env.get(TOKEN_ENV):
        return Credentials(token=env[TOKEN_ENV], source=f"${TOKEN_ENV}")
    if env.get(USER_ENV):
        return Credentials(env[USER_ENV], env.get(PASSWORD_ENV, ""), source=f"${USER_ENV}/${PASSWORD_ENV}")
    if env.get(PASSWORD_ENV):
        raise PacsError(f"${PASSWORD_ENV} is set but ${USER_ENV} is not", "usage")
    if env.get(CREDENTIALS_FILE_ENV):
        return _credentials_from_file(env[CREDENTIALS_FILE_ENV])
    return None


# ---------------------------------------------------------------------------------------- server spec
@dataclass(frozen=True)
class ServerSpec:
    """A parsed server string (see the module docstring). ``protocol``: ``dicomweb`` or ``dimse``."""

    protocol: str
    host: str
    port: int
    url: str = ""                          # DICOMweb base URL (http(s)://host:port/path)
    called_aet: str = ""                   # DIMSE: the server's AE title
    calling_aet: str = DEFAULT_CALLING_AET  # DIMSE: ours
    retrieve: str = "get"                  # DIMSE: get | move
    move_dest: str = ""                    # DIMSE C-MOVE destination AE title (registered at the PACS)
    store_port: int = 0                    # DIMSE C-MOVE: the port our storage SCP listens on
    store_bind: str = ""                   # address it binds to ("" = all interfaces)
    timeout: float = DEFAULT_TIMEOUT_S
    credentials: Credentials | None = field(default=None, repr=False, compare=False)

    def display(self) -> str:
        """The server as messages name it (no credentials, no query parameters)."""
        if self.protocol == "dicomweb":
            return f"dicomweb+{self.url}"
        return f"dimse://{self.called_aet}@{self.host}:{self.port}"


def _check_aet(value: str, what: str) -> str:
    value = value.strip()
    if not _AET.match(value):
        raise PacsError(f"{what} {value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)",
                        "usage")
    return value


def parse_server(text: str, credentials: Credentials | None = None) -> ServerSpec:
    """Parse a server string; raises :class:`PacsError` (kind ``usage``) with the accepted forms."""
    forms = "dicomweb+http://HOST:PORT/PATH or dimse://CALLED_AET@HOST:PORT[?calling=AET&retrieve=get|move...]"
    parts = urlsplit(str(text).strip())
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        scheme = "dicomweb+" + scheme
    if scheme not in ("dicomweb+http", "dicomweb+https", "dimse"):
        raise PacsError(f"unknown server {text!r}: expected {forms}", "usage")
    try:
        port = parts.port
    except ValueError:
        raise PacsError(f"bad port in server {text!r}", "usage") from None
    host = parts.hostname or ""
    if not host:
        raise PacsError(f"no host in server {text!r}: expected {forms}", "usage")
    if scheme.startswith("dicomweb"):
        if parts.username or parts.password:
            raise PacsError("put credentials in $MEDIMB_PACS_USER/$MEDIMB_PACS_PASSWORD or a credentials file, "
                            "not in the server URL (command lines are visible to other users)", "usage")
        if parts.query:
            raise PacsError(f"a DICOMweb server takes no query parameters: {text!r}", "usage")
        web = scheme.removeprefix("dicomweb+")
        port = port or (443 if web == "https" else 80)
        netloc = f"[{host}]" if ":" in host else host
        url = f"{web}://{netloc}:{port}{parts.path.rstrip('/')}"
        return ServerSpec("dicomweb", host, port, url=url, credentials=credentials)
    # dimse
    if parts.password:
        raise PacsError("put credentials in $MEDIMB_PACS_USER/$MEDIMB_PACS_PASSWORD or a credentials file, "
                        "not in the server string", "usage")
    if not parts.username:
        raise PacsError(f"no called AE title in server {text!r}: expected dimse://CALLED_AET@HOST:PORT", "usage")
    if port is None:
        raise PacsError(f"no port in server {text!r}: expected dimse://CALLED_AET@HOST:PORT", "usage")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - {"calling", "retrieve", "move_dest", "store_port", "store_bind", "timeout"}
    if unknown:
        raise PacsError(f"unknown parameter(s) {', '.join(sorted(unknown))} in server {text!r}", "usage")
    calling = _check_aet(query.get("calling", DEFAULT_CALLING_AET), "calling")
    retrieve = query.get("retrieve", "move" if ("move_dest" in query or "store_port" in query) else "get").lower()
    if retrieve not in ("get", "move"):
        raise PacsError(f"retrieve={retrieve!r}: expected get or move", "usage")
    move_dest = _check_aet(query.get("move_dest", calling), "move_dest")
    try:
        store_port = int(query.get("store_port", "0"))
        timeout = float(query.get("timeout", DEFAULT_TIMEOUT_S))
    except ValueError:
        raise PacsError(f"store_port and timeout must be numbers in server {text!r}", "usage") from None
    if retrieve == "move" and not 0 < store_port < 65536:
        raise PacsError("retrieve=move needs store_port=N: the port the PACS sends the images to (registered with "
                        "move_dest at the PACS)", "usage")
    if timeout <= 0:
        raise PacsError("timeout must be positive", "usage")
    from urllib.parse import unquote

    return ServerSpec("dimse", host, port, called_aet=_check_aet(unquote(parts.username), "called AE title"),
                      calling_aet=calling, retrieve=retrieve, move_dest=move_dest, store_port=store_port,
                      store_bind=query.get("store_bind", ""), timeout=timeout, credentials=credentials)


# ----------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class InstanceRef:
    """One instance on the server, as a find at instance (IMAGE) level lists it."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str = ""


def open_server(spec: ServerSpec):
    """A connection for ``spec`` (a context manager: ``with open_server(spec) as server``)."""
    if spec.protocol == "dicomweb":
        return DicomWebServer(spec)
    return DimseServer(spec)


def _check_reachable(host: str, port: int, timeout: float, name: str) -> None:
    """A plain TCP connect first, so that 'nothing listens there' reads as such."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if isinstance(exc, socket.timeout):
            why = "timed out"
        raise PacsError(f"cannot reach {name}: {why}", "unreachable") from None


class _Connection:
    def __init__(self, spec: ServerSpec):
        self.spec = spec

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass

    @property
    def name(self) -> str:
        return self.spec.display()

    def _unknown_study(self, study_uid: str) -> PacsError:
        return PacsError(f"study {study_label(study_uid)} not found on {self.name}", "unknown_study")


# ------------------------------------------------------------------------------------------- DICOMweb
class DicomWebServer(_Connection):
    """QIDO-RS / WADO-RS / STOW-RS with ``dicomweb-client`` (one HTTP session, reused)."""

    def __init__(self, spec: ServerSpec):
        super().__init__(spec)
        import requests
        from dicomweb_client import DICOMwebClient

        # dicomweb-client logs each request at INFO, with the UIDs: shown with --verbose only
        logging.getLogger("dicomweb_client").setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG)
                                                      else logging.WARNING)

        session = requests.Session()
        headers = {}
        creds = spec.credentials
        if creds is not None and creds.token:
            headers["Authorization"] = f"Bearer {creds.token}"
        elif creds is not None:
            session.auth = (creds.user, creds.password)
        if not requests.utils.get_environ_proxies(spec.url):  # direct: say at once when nothing listens
            _check_reachable(spec.host, spec.port, spec.timeout, self.name)  # (dicomweb-client retries for ~30 s)
        self._client = DICOMwebClient(spec.url, session=session, headers=headers or None,
                                      timeout=spec.timeout)
        self._session = session

    def close(self) -> None:
        self._session.close()

    @contextlib.contextmanager
    def _errors(self, study_uid: str | None = None):
        import requests

        try:
            yield
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code in (401, 403):
                who = f" as {self.spec.credentials}" if self.spec.credentials else " (no credentials given)"
                raise PacsError(f"{self.name} refused the login{who}: HTTP {code}", "auth") from None
            if code == 404 and study_uid is not None:
                raise self._unknown_study(study_uid) from None
            if code == 404:
                raise PacsError(f"{self.name}: not found (HTTP 404); is the DICOMweb path right?", "failed") from None
            raise PacsError(f"{self.name} answered HTTP {code}", "failed") from None
        except requests.exceptions.Timeout:
            raise PacsError(f"cannot reach {self.name}: timed out after {self.spec.timeout:g} s",
                            "unreachable") from None
        except requests.exceptions.ConnectionError:
            raise PacsError(f"cannot reach {self.name}: connection failed", "unreachable") from None
        except requests.exceptions.RequestException as exc:
            raise PacsError(f"{self.name}: {type(exc).__name__}", "failed") from None

    def echo(self) -> None:
        """A minimal QIDO-RS query (DICOMweb has no echo): checks address, path and credentials."""
        with self._errors():
            self._client.search_for_studies(limit=1)

    def find_studies(self, filters: dict[str, str]) -> list[dict]:
        """Study-level QIDO-RS; ``filters`` keyword -> value (wildcards ``*``/``?``, date ranges ``A-B``).
        Returns one dict per study: keyword -> value (str) of the standard study attributes."""
        with self._errors():
            found = _pages(lambda offset: self._client.search_for_studies(
                search_filters=dict(filters), fields=list(STUDY_FIELDS), offset=offset, limit=QIDO_PAGE),
                key=lambda kw: kw.get("StudyInstanceUID"))
        # servers may answer more attributes than asked for (Orthanc adds the patient's): keep ours
        return [{kw: v for kw, v in item.items() if kw in STUDY_FIELDS} for item in found]

    def find_instances(self, study_uid: str, series_uid: str | None = None) -> list[InstanceRef]:
        """Every instance of a study (or series); :class:`PacsError` ``unknown_study`` when none."""
        with self._errors(study_uid):
            found = _pages(lambda offset: self._client.search_for_instances(
                study_uid, series_uid, offset=offset, limit=QIDO_PAGE, fields=["SeriesInstanceUID"]),
                key=lambda kw: kw.get("SOPInstanceUID"))
        refs = [InstanceRef(study_uid, kw.get("SeriesInstanceUID", series_uid or ""), kw.get("SOPInstanceUID", ""),
                            kw.get("SOPClassUID", "")) for kw in found]
        if not refs:
            raise self._unknown_study(study_uid)
        return refs

    def retrieve(self, study_uid: str, series_uid: str | None = None, sop_uids: Iterable[str] | None = None,
                 on_instance: Callable = None) -> int:
        """WADO-RS: stream a series (or the study) or fetch the given instances; ``on_instance(ds)``
        is called with each dataset (file meta included) as it arrives. Returns how many arrived."""
        n = 0
        with self._errors(study_uid):
            if sop_uids is not None:
                if series_uid is None:
                    raise ValueError("instances are retrieved per series")
                for sop in sop_uids:
                    on_instance(self._client.retrieve_instance(study_uid, series_uid, sop))
                    n += 1
                return n
            stream = (self._client.iter_study(study_uid) if series_uid is None
                      else self._client.iter_series(study_uid, series_uid))
            for ds in stream:
                on_instance(ds)
                n += 1
        return n

    def store(self, datasets: Iterable) -> int:
        """STOW-RS, one request per 16 instances (bounded memory); returns how many were stored."""
        batch, n = [], 0
        with self._errors():
            for ds in datasets:
                batch.append(ds)
                if len(batch) == 16:
                    n += self._stow(batch)
                    batch = []
            if batch:
                n += self._stow(batch)
        return n

    def _stow(self, batch) -> int:
        answer = self._client.store_instances(batch)
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise PacsError(f"{self.name} refused {len(failed)} of {len(batch)} instances (STOW-RS)", "failed")
        return len(batch)


def _pages(search: Callable[[int], list], key: Callable[[dict], str]) -> list[dict]:
    """Every result of a QIDO-RS search, page by page: ``search(offset)`` -> DICOM JSON items. Servers may
    return fewer than the limit asked for (their own cap), so pages are fetched until one brings nothing new
    (a server that ignores ``offset`` repeats its first page: that ends it too). Returns keyword dicts."""
    out: list[dict] = []
    seen: set = set()
    while True:
        new = []
        for item in search(len(out)):
            kw = _json_keywords(item)
            if key(kw) not in seen:
                seen.add(key(kw))
                new.append(kw)
        if not new:
            return out
        out += new


def _json_keywords(item: dict) -> dict:
    """DICOM JSON (tag -> {"vr", "Value"}) -> keyword -> first value as str (joined with ``\\``)."""
    from pydicom.datadict import keyword_for_tag

    out = {}
    for tag, element in item.items():
        values = element.get("Value") or []
        kw = keyword_for_tag(int(tag, 16)) or tag
        out[kw] = "\\".join(str(v.get("Alphabetic", v)) if isinstance(v, dict) else str(v) for v in values)
    return out


# ---------------------------------------------------------------------------------------------- DIMSE
class DimseServer(_Connection):
    """C-ECHO / C-FIND / C-GET or C-MOVE / C-STORE with ``pynetdicom``; one association per operation
    (a C-GET association needs up to 127 storage contexts, leaving no room for the others)."""

    def __init__(self, spec: ServerSpec):
        super().__init__(spec)
        self._scp = None              # the C-MOVE storage SCP, started at the first move, stopped by close()
        self._receiver: _Receiver | None = None
        # pynetdicom logs every association and our query identifiers at INFO (shown with --verbose) and dumps
        # whole PDUs and datasets at DEBUG (never shown: they can hold names); our one-line errors say what failed
        logging.getLogger("pynetdicom").setLevel(logging.INFO if log.isEnabledFor(logging.DEBUG)
                                                 else logging.CRITICAL + 1)

    def _ae(self, op: str, contexts=()):
        """Our AE for one kind of operation, with its requested ``contexts`` ((abstract, [transfer syntaxes])
        or a presentation context), built once per process (C-GET's 121 contexts take about 0.5 s)."""
        cache_key = (op, self.spec.calling_aet, self.spec.timeout)
        ae = _AES.get(cache_key)
        if ae is None:
            from pynetdicom import AE

            ae = AE(ae_title=self.spec.calling_aet)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.spec.timeout
            ae.connection_timeout = min(self.spec.timeout, 10.0)
            for cx in contexts:
                if isinstance(cx, tuple):
                    ae.add_requested_context(*cx)
                else:
                    ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
            if len(_AES) > 32:
                _AES.clear()
            _AES[cache_key] = ae
        return ae

    def close(self) -> None:
        if self._scp is not None:
            self._scp.shutdown()
            self._scp = None

    def _ext_neg(self) -> list:
        creds = self.spec.credentials
        if creds is None:
            return []
        from pynetdicom.pdu_primitives import UserIdentityNegotiation

        ident = UserIdentityNegotiation()
        if creds.token:
            ident.user_identity_type = 5 if creds.token.count(".") == 2 else 3  # JWT or SAML-like token
            ident.primary_field = creds.token.encode()
        else:
            ident.user_identity_type = 2  # username and passcode
            ident.primary_field = creds.user.encode()
            ident.secondary_field = creds.password.encode()
        return [ident]

    @contextlib.contextmanager
    def _association(self, ae, ext_neg=(), handlers=None) -> Iterator:
        spec = self.spec
        _check_reachable(spec.host, spec.port, spec.timeout, self.name)
        assoc = ae.associate(spec.host, spec.port, ae_title=spec.called_aet, ext_neg=list(ext_neg) + self._ext_neg(),
                             evt_handlers=handlers or [])
        if not assoc.is_established:
            if assoc.is_rejected:
                raise PacsError(f"{self.name} refused the association from {spec.calling_aet} (check the called AE "
                                "title, and that the PACS knows our calling AE title and host)", "refused")
            if assoc.is_aborted:
                raise PacsError(f"{self.name} aborted the association from {spec.calling_aet} (none of the services "
                                "offered accepted, or authentication or AE title not accepted)", "refused")
            raise PacsError(f"cannot associate with {self.name}: no answer within {spec.timeout:g} s", "unreachable")
        assoc._medimb_started = time.monotonic()  # for _check_status: a refusal answers fast, a timeout does not
        try:
            yield assoc
        except ValueError as exc:  # pynetdicom: the server accepted no presentation context for what we send
            if assoc.is_established:
                assoc.abort()
            if "No presentation context" not in str(exc):
                raise
            what = str(exc).split("'")[1] if "'" in str(exc) else "this service"
            hint = " (try retrieve=move, or DICOMweb)" if "Get" in what else ""
            raise PacsError(f"{self.name} does not accept {what} from {spec.calling_aet}{hint}", "refused") from None
        except BaseException:
            if assoc.is_established:  # interrupted or failed mid-operation: do not wait for the server
                assoc.abort()
            raise
        if assoc.is_established:
            assoc.release()

    def echo(self) -> None:
        from pynetdicom.sop_class import Verification

        with self._association(self._ae("echo", [(Verification,)])) as assoc:
            status = assoc.send_c_echo()
            _check_status(status, self.name, "C-ECHO", assoc)

    def _find(self, query, level_name: str) -> list:
        """One C-FIND on its own association; the matches' identifiers."""
        with self._association(self._ae("find", [(_FIND_MODEL,)])) as assoc:
            return self._find_on(assoc, query, level_name)

    def _find_on(self, assoc, query, level_name: str) -> list:
        out = []
        for status, identifier in assoc.send_c_find(query, _FIND_MODEL):
            code = _check_status(status, self.name, f"C-FIND ({level_name})", assoc)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                out.append(identifier)
        return out

    def find_studies(self, filters: dict[str, str]) -> list[dict]:
        """Study-level C-FIND (Study Root); ``filters`` keyword -> value as for DICOMweb."""
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        for kw in STUDY_FIELDS:
            setattr(q, kw, "")
        for kw, value in filters.items():
            setattr(q, kw, value)
        found = self._find(q, "studies")
        return [{kw: _value_str(ds.get(kw)) for kw in STUDY_FIELDS if kw in ds} for ds in found]

    def find_instances(self, study_uid: str, series_uid: str | None = None) -> list[InstanceRef]:
        """The study's series (SERIES level), then each series' instances (IMAGE level), on one association:
        strictly hierarchical servers answer an IMAGE-level query only for one given series."""
        from pydicom.dataset import Dataset

        refs = []
        with self._association(self._ae("find", [(_FIND_MODEL,)])) as assoc:
            if series_uid is None:
                q = Dataset()
                q.QueryRetrieveLevel = "SERIES"
                q.StudyInstanceUID = study_uid
                q.SeriesInstanceUID = ""
                series = [str(ds.SeriesInstanceUID) for ds in self._find_on(assoc, q, "series")
                          if ds.get("SeriesInstanceUID")]
            else:
                series = [series_uid]
            for uid in dict.fromkeys(series):
                q = Dataset()
                q.QueryRetrieveLevel = "IMAGE"
                q.StudyInstanceUID = study_uid
                q.SeriesInstanceUID = uid
                q.SOPInstanceUID = ""
                q.SOPClassUID = ""
                refs += [InstanceRef(study_uid, uid, str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", "")))
                         for ds in self._find_on(assoc, q, "instances")]
        if not refs:
            raise self._unknown_study(study_uid)
        return refs

    def _retrieve_query(self, study_uid, series_uid, sop_uids):
        from pydicom.dataset import Dataset

        q = Dataset()
        q.StudyInstanceUID = study_uid
        q.QueryRetrieveLevel = "STUDY"
        if series_uid is not None:
            q.QueryRetrieveLevel = "SERIES"
            q.SeriesInstanceUID = series_uid
        if sop_uids is not None:
            q.QueryRetrieveLevel = "IMAGE"
            q.SOPInstanceUID = list(sop_uids)
        return q

    def retrieve(self, study_uid: str, series_uid: str | None = None, sop_uids: Iterable[str] | None = None,
                 on_instance: Callable = None) -> int:
        """C-GET (or C-MOVE to our storage SCP, per the server string) of a study, a series or the given
        instances; ``on_instance(ds)`` is called with each dataset (file meta included; from the storage
        thread under C-MOVE, one at a time; the bytes as received in ``getattr(ds, ENCODED_ATTR)``).
        Returns how many arrived."""
        query = self._retrieve_query(study_uid, series_uid, list(sop_uids) if sop_uids is not None else None)
        received = _Receiver(on_instance)
        if self.spec.retrieve == "move":
            self._move(query, received)
        else:
            self._get(query, received)
        if received.error is not None:
            raise received.error
        return received.count

    def _get(self, query, received: "_Receiver") -> None:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GetModel

        storage = _storage_contexts()[:127]  # an association holds at most 128 presentation contexts
        ae = self._ae("get", [(GetModel,)] + storage)
        roles = [build_role(cx.abstract_syntax, scp_role=True) for cx in storage]
        with self._association(ae, roles, [(evt.EVT_C_STORE, received.handle)]) as assoc:
            self._run_retrieve(assoc.send_c_get(query, GetModel), "C-GET", query, assoc)

    def _move(self, query, received: "_Receiver") -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MoveModel

        spec = self.spec
        if self._scp is None:
            scp = AE(ae_title=spec.move_dest)
            scp.network_timeout = scp.dimse_timeout = scp.acse_timeout = spec.timeout
            for cx in _storage_contexts():
                scp.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
            try:
                self._scp = scp.start_server((spec.store_bind, spec.store_port), block=False,
                                             evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
            except OSError as exc:
                raise PacsError(f"cannot listen on port {spec.store_port} for C-MOVE: {exc.strerror or exc}",
                                "usage") from None
        self._receiver = received
        try:
            with self._association(self._ae("move", [(MoveModel,)])) as assoc:
                self._run_retrieve(assoc.send_c_move(query, spec.move_dest, MoveModel), "C-MOVE", query, assoc)
        finally:
            self._receiver = None

    def _on_store(self, event) -> int:
        """C-STORE requests on our SCP go to the retrieve in progress; between retrieves they are refused."""
        receiver = self._receiver
        return receiver.handle(event) if receiver is not None else 0xA700

    def _run_retrieve(self, responses, op: str, query, assoc) -> None:
        last = None
        for status, _identifier in responses:
            if not status:  # no answer within the timeout, or the association was aborted
                _check_status(status, self.name, op, assoc)
            last = int(status.Status)
            if last in (0xA701, 0xA702) and op == "C-MOVE":
                raise PacsError(f"{self.name} cannot send to {self.spec.move_dest}: not a known move destination "
                                "(ask the PACS administrator to register our AE title, host and port)", "refused")
            if last == 0xA801:
                raise PacsError(f"{self.name} does not know the move destination {self.spec.move_dest} (ask the PACS "
                                "administrator to register our AE title, host and store_port)", "refused")
        if last is None:
            raise PacsError(f"{op} from {self.name}: no answer", "failed")
        if last not in (0x0000, 0xB000):  # success, or warning (some sub-operations failed: counted by the caller)
            study = study_label(str(query.StudyInstanceUID))
            hint = (f" (is {self.spec.move_dest} registered at the PACS as a move destination with our host and port "
                    f"{self.spec.store_port}?)" if op == "C-MOVE" else "")
            raise PacsError(f"{op} of study {study} from {self.name} failed with status 0x{last:04X}{hint}", "failed")

    def store(self, datasets: Iterable) -> int:
        """C-STORE each dataset (one association per call, contexts from the datasets' SOP classes and
        transfer syntaxes); returns how many were stored."""
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        datasets = list(datasets)
        if not datasets:
            return 0
        wanted: dict[str, set] = {}
        for ds in datasets:
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or ExplicitVRLittleEndian
            wanted.setdefault(str(ds.SOPClassUID), set()).update({str(ts), ExplicitVRLittleEndian,
                                                                  ImplicitVRLittleEndian})
        if len(wanted) > 128:
            raise PacsError("more than 128 SOP classes in one push", "usage")
        contexts = [(sop_class, sorted(syntaxes)) for sop_class, syntaxes in sorted(wanted.items())]
        ae = self._ae(f"store {contexts}", contexts)
        n = 0
        with self._association(ae) as assoc:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                _check_status(status, self.name, "C-STORE", assoc)
                n += 1
        return n


#: DIMSE retrieves set this attribute of each dataset they hand out: the instance as received, in the DICOM
#: file format (bytes); DICOMweb datasets do not have it (dicomweb-client hands out decoded datasets only)
ENCODED_ATTR = "_medimb_file_bytes"


#: our AEs by (operation, calling AE title, timeout): an AE is configuration only, reusable across associations
_AES: dict = {}


class _Receiver:
    """The C-STORE handler of a retrieve: hands each dataset to ``on_instance``; any error is kept (and
    answered with a failure status) and re-raised by the caller after the retrieve."""

    def __init__(self, on_instance: Callable):
        self.on_instance = on_instance
        self.count = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def handle(self, event) -> int:
        with self._lock:
            if self.error is not None:
                return 0xA700  # stop: out of resources
            try:
                ds = event.dataset
                ds.file_meta = event.file_meta
                # the instance exactly as sent (preamble, file meta, the peer's encoding): writers keep these
                # bytes instead of re-encoding the decoded dataset (lossless and faster)
                setattr(ds, ENCODED_ATTR, event.encoded_dataset(include_meta=True))
                self.on_instance(ds)
                self.count += 1
                return 0x0000
            except BaseException as exc:  # noqa: BLE001 - re-raised in the requesting thread
                self.error = exc
                return 0xA700


_STORAGE_CONTEXTS = None
#: Study Root C-FIND (every DIMSE query here is study-rooted)
_FIND_MODEL = "1.2.840.10008.5.1.4.1.2.2.1"


def _storage_contexts() -> list:
    """pynetdicom's storage presentation contexts (MR, CT, enhanced, segmentation, parametric map, ...),
    each offering the uncompressed and the common lossless and lossy transfer syntaxes
    (:data:`STORAGE_TRANSFER_SYNTAXES`), so images arrive as the PACS stores them (no transcoding). Not
    all 45 syntaxes pynetdicom knows: 121 contexts x 45 syntaxes make association negotiation take ~1 s."""
    global _STORAGE_CONTEXTS
    if _STORAGE_CONTEXTS is None:
        from pynetdicom import StoragePresentationContexts, build_context

        classes = [cx.abstract_syntax for cx in StoragePresentationContexts]
        classes += [uid for uid in EXTRA_STORAGE_CLASSES if uid not in classes]
        _STORAGE_CONTEXTS = [build_context(uid, list(STORAGE_TRANSFER_SYNTAXES)) for uid in classes[:127]]
    return _STORAGE_CONTEXTS


#: storage SOP classes pynetdicom's default list (120, cut to fit one association) leaves out but a breast
#: imaging study can hold, among them medimb's own results (C-GET can carry 127 besides the GET context)
EXTRA_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.30",        # Parametric Map (medimb export-dicom's maps)
    "1.2.840.10008.5.1.4.1.1.66.7",      # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.66.8",      # Height Map Segmentation
    "1.2.840.10008.5.1.4.1.1.13.1.4",    # Breast Projection X-Ray Image, For Presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5",    # Breast Projection X-Ray Image, For Processing
    "1.2.840.10008.5.1.4.1.1.88.35",     # Extensible SR
    "1.2.840.10008.5.1.4.1.1.90.1",      # Content Assessment Results
)


#: transfer syntaxes offered for images we receive; uncompressed first (a server that picks the first one
#: it has then sends what needs no codec on our side), then what PACS store compressed
STORAGE_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",     # Explicit VR Little Endian
    "1.2.840.10008.1.2",       # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",     # Explicit VR Big Endian (retired, still in old archives)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.5",     # RLE Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)


def _value_str(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _check_status(status, name: str, op: str, assoc=None) -> int:
    """The status code of a response; :class:`PacsError` when there was none or it is a failure."""
    if not status:
        # pynetdicom gives an empty status when the server did not answer in time (it then aborts) or
        # answered with something it could not read: Orthanc's reply when our calling AE title may not do this
        timed_out = assoc is not None and time.monotonic() - getattr(assoc, "_medimb_started", 0) >= \
            assoc.dimse_timeout - 0.5
        if assoc is None or timed_out:
            raise PacsError(f"{op} to {name}: no answer within the timeout", "failed")
        raise PacsError(f"{name} refused {op} from {assoc.ae.ae_title} (is our calling AE title allowed to query and "
                        "retrieve? ask the PACS administrator)", "refused")
    code = int(status.Status)
    if code in (0x0000, 0xFF00, 0xFF01) or (code & 0xF000) == 0xB000:
        return code
    if code in (0xA700, 0xA701, 0xA702, 0x0124, 0x0122):
        raise PacsError(f"{name} refused {op}: status 0x{code:04X} (not permitted or not supported for "
                        "our AE title)", "refused")
    raise PacsError(f"{op} to {name} failed with status 0x{code:04X}", "failed")
