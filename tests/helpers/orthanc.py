"""A real Orthanc DICOM server for tests: started on free loopback ports, stopped afterwards.

:func:`start_orthanc` runs ``Orthanc`` (Debian packages ``orthanc`` + ``orthanc-dicomweb``; ``.ci/run``
installs them) with a generated JSON configuration:

- HTTP (REST + DICOMweb at ``/dicom-web``) and DICOM ports: free loopback ports; ``RemoteAccessAllowed``
  false; storage and index in a temporary folder (removed by :meth:`OrthancServer.stop`);
- HTTP basic authentication on, one user (:attr:`OrthancServer.user` / :attr:`OrthancServer.password`);
  requests without them are refused (401), which tests use for the "wrong password" and "no
  credentials" cases;
- AE title :data:`AET`, the called AE title checked (``DicomCheckCalledAet``: a wrong one is refused);
- one registered modality, our AE title :data:`CALLING_AET` at 127.0.0.1 :attr:`OrthancServer.move_port`:
  the C-MOVE destination, and the only AE allowed C-FIND / C-GET / C-MOVE / C-STORE, from 127.0.0.1 only
  (Orthanc 1.10 has no bind address: its ports listen on every interface); any AE may C-ECHO.

The pytest fixture ``orthanc`` (tests/conftest.py, session scope) yields one :class:`OrthancServer`;
it skips only when the Orthanc binary or its DICOMweb plugin cannot be found (the message says which
and how to install them). Tests share the one server: upload what you need and address it by UID
(or call :meth:`OrthancServer.clear` first). Interface (stable)::

    orthanc.dicomweb_server                    # "dicomweb+http://127.0.0.1:PORT/dicom-web"
    orthanc.dimse_server("get" | "move")       # "dimse://ORTHANC@127.0.0.1:PORT?calling=MEDIMB[&...move]"
    orthanc.credentials                        # data_prep.pacs.server.Credentials for the test user
    orthanc.credentials_env()                  # {"MEDIMB_PACS_USER": ..., "MEDIMB_PACS_PASSWORD": ...}
    orthanc.rest("GET", "/studies")            # requests.Response (authenticated)
    orthanc.upload(paths) / upload_folder(dir) # POST /instances; returns Orthanc instance ids
    orthanc.study_uids()                       # StudyInstanceUIDs stored
    orthanc.delete_study(uid) / clear()

Environment overrides: ``MEDIMB_ORTHANC`` (the binary), ``MEDIMB_ORTHANC_PLUGINS`` (folder of
``libOrthancDicomWeb.so``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

AET = "ORTHANC"
CALLING_AET = "MEDIMB"
USER = "medimb"
PLUGIN_NAME = "libOrthancDicomWeb.so"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins",
               "/usr/lib/x86_64-linux-gnu/orthanc/plugins")
INSTALL_HINT = ("install the Debian packages orthanc and orthanc-dicomweb "
                "(apt-get install orthanc orthanc-dicomweb; .ci/run does this)")


def find_orthanc() -> tuple[str | None, str | None, str]:
    """(binary, DICOMweb plugin path, why-not): the paths, or Nones and a reason to skip."""
    if os.environ.get("MEDIMB_ORTHANC"):
        binary = os.environ["MEDIMB_ORTHANC"]
        if not os.access(binary, os.X_OK):
            return None, None, f"$MEDIMB_ORTHANC={binary} is not an executable file"
    else:
        binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
    if not binary:
        return None, None, f"Orthanc not found (no Orthanc on PATH or /usr/sbin/Orthanc): {INSTALL_HINT}"
    dirs = [os.environ["MEDIMB_ORTHANC_PLUGINS"]] if os.environ.get("MEDIMB_ORTHANC_PLUGINS") else list(PLUGIN_DIRS)
    for d in dirs:
        if (Path(d) / PLUGIN_NAME).is_file():
            return binary, str(Path(d) / PLUGIN_NAME), ""
    return binary, None, f"the Orthanc DICOMweb plugin ({PLUGIN_NAME}) is not in {', '.join(dirs)}: {INSTALL_HINT}"


def free_port() -> int:
    """A currently free loopback TCP port (the OS picks; a tiny race with other processes remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class OrthancServer:
    """A running Orthanc (see the module docstring)."""

    process: subprocess.Popen
    workdir: Path
    http_port: int
    dicom_port: int
    move_port: int
    password: str
    user: str = USER
    aet: str = AET
    calling_aet: str = CALLING_AET
    _session: object = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_server(self) -> str:
        return f"dicomweb+{self.http_url}/dicom-web"

    def dimse_server(self, retrieve: str = "get", called_aet: str | None = None) -> str:
        base = f"dimse://{called_aet or self.aet}@127.0.0.1:{self.dicom_port}?calling={self.calling_aet}&timeout=20"
        if retrieve == "move":
            base += f"&retrieve=move&move_dest={self.calling_aet}&store_port={self.move_port}&store_bind=127.0.0.1"
        return base

    @property
    def credentials(self):
        from data_prep.pacs.server import Credentials

        return Credentials(self.user, self.password, source="test")

    def credentials_env(self) -> dict:
        return {"MEDIMB_PACS_USER": self.user, "MEDIMB_PACS_PASSWORD": self.password}

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def rest(self, method: str, path: str, **kwargs):
        """An authenticated request to Orthanc's REST API; raises for an HTTP error status."""
        import requests

        if self._session is None:
            self._session = requests.Session()
            self._session.auth = (self.user, self.password)
        r = self._session.request(method, self.http_url + path, timeout=60, **kwargs)
        r.raise_for_status()
        return r

    def upload(self, paths, skip_rejected: bool = False) -> list[str]:
        """POST each DICOM file to /instances; returns the Orthanc instance ids. ``skip_rejected``: leave
        out files Orthanc refuses as invalid (HTTP 400, e.g. a truncated file) instead of raising."""
        import requests

        ids = []
        for p in paths:
            try:
                ids.append(self.rest("POST", "/instances", data=Path(p).read_bytes()).json()["ID"])
            except requests.HTTPError as exc:
                if not (skip_rejected and exc.response is not None and exc.response.status_code == 400):
                    raise
        return ids

    def upload_folder(self, folder) -> list[str]:
        """Upload every DICOM file (``DICM`` at byte 128) under ``folder`` but DICOMDIR indexes, leaving out
        those Orthanc rejects (the synthetic archive's truncated file); returns the instance ids."""
        def is_dicom(p: Path) -> bool:
            with open(p, "rb") as fh:
                return fh.read(132)[128:] == b"DICM"

        files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != "DICOMDIR" and is_dicom(p))
        return self.upload(files, skip_rejected=True)

    def study_uids(self) -> list[str]:
        out = []
        for sid in self.rest("GET", "/studies").json():
            out.append(self.rest("GET", f"/studies/{sid}").json()["MainDicomTags"]["StudyInstanceUID"])
        return sorted(out)

    def delete_study(self, study_uid: str) -> None:
        for sid in self.rest("POST", "/tools/lookup", data=study_uid).json():
            if sid.get("Type") == "Study":
                self.rest("DELETE", f"/studies/{sid['ID']}")

    def clear(self) -> None:
        """Delete every patient (and so every study) stored."""
        for pid in self.rest("GET", "/patients").json():
            self.rest("DELETE", f"/patients/{pid}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s) and remove its storage."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self._session is not None:
            self._session.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def orthanc_config(workdir: Path, http_port: int, dicom_port: int, move_port: int, password: str,
                   plugin: str) -> dict:
    """The JSON configuration :func:`start_orthanc` writes (see the module docstring)."""
    storage = str(workdir / "storage")
    return {
        "Name": "medimb-test",
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: password},
        "SslEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        # Orthanc 1.10 listens on every interface (no bind option): only our AE title from 127.0.0.1 may do more
        # than echo
        "DicomCheckModalityHost": True,
        "DicomModalities": {"medimb": {"AET": CALLING_AET, "Host": "127.0.0.1", "Port": move_port}},
        "DicomModalitiesInDatabase": False,
        "DicomScpTimeout": 30,
        "DicomScuTimeout": 20,
        "UnknownSopClassAccepted": True,
        "OverwriteInstances": True,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "HttpThreadsCount": 10,
        "DicomThreadsCount": 4,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "StableAge": 2,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": f"127.0.0.1:{http_port}",
                     "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }


def start_orthanc(binary: str, plugin: str, timeout_s: float = 60.0, base_dir: str | None = None) -> OrthancServer:
    """Start Orthanc with a fresh configuration and storage; returns once ``/system`` answers.

    Raises ``RuntimeError`` with the end of Orthanc's log when it exits or does not answer in time."""
    import requests

    workdir = Path(tempfile.mkdtemp(prefix="medimb-orthanc-", dir=base_dir))
    password = os.urandom(9).hex()
    http_port, dicom_port, move_port = free_port(), free_port(), free_port()
    while len({http_port, dicom_port, move_port}) < 3:
        dicom_port, move_port = free_port(), free_port()
    config = workdir / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(workdir, http_port, dicom_port, move_port, password, plugin),
                                 indent=2))
    log = open(workdir / "orthanc.log", "wb")
    process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=workdir)
    log.close()
    server = OrthancServer(process, workdir, http_port, dicom_port, move_port, password)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            shutil.rmtree(workdir, ignore_errors=True)
            raise RuntimeError(f"Orthanc exited with status {process.returncode} on start:\n{tail}")
        try:
            r = requests.get(server.http_url + "/system", auth=(USER, password), timeout=2)
            if r.status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            server.stop()
            raise RuntimeError(f"Orthanc did not answer /system within {timeout_s:g} s:\n{tail}")
        time.sleep(0.1)
    plugins = server.rest("GET", "/plugins").json()
    if "dicom-web" not in plugins:
        server.stop()
        raise RuntimeError(f"Orthanc started without its DICOMweb plugin (loaded: {plugins})")
    return server
