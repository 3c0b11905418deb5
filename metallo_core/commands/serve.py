"""`metallo serve`: classify in a web page, on 127.0.0.1 by default.

    metallo serve                                   # http://127.0.0.1:7860, uploads only
    metallo serve --root /data/micrographs          # the page may also name folders under /data/micrographs
    METALLO_SERVE_PASSWORD=... metallo serve --host 0.0.0.0   # another address: a password is required

The page runs `metallo classify`'s own code (commands/classify_app.py) on the uploads; see serve_page.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from metallo_core.errors import ConfigError
from metallo_core.user_paths import cli_path

PASSWORD_ENV = "METALLO_SERVE_PASSWORD"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="classify in a web page: pick a registered model, drop support and query images, read and "
             "download the predictions (on 127.0.0.1 unless --host says otherwise)",
        description="A web page for metallo classify (the same code, the same CSV). Uploads are kept in a "
                    "temporary folder of the session and deleted when its tab closes and when the server stops; "
                    "only the CSV you download is kept.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only); any other needs a "
                             f"password in ${PASSWORD_ENV} or --password-file")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--password-file", default="", type=cli_path,
                        help=f"a file holding the page's password (user: --user); or set ${PASSWORD_ENV}")
    parser.add_argument("--user", default="metallo", help="the user name the password goes with")
    parser.add_argument("--root", action="append", default=[], type=cli_path, metavar="DIR",
                        help="a folder whose sub-folders the page may give as support or query (repeatable); "
                             "paths outside every --root are refused. None: uploads only")
    parser.add_argument("--model", default="", help="the model chosen when the page opens (a models:/ URI)")
    parser.add_argument("--max-files", type=int, default=500, help="most files uploaded in one run")
    parser.add_argument("--max-file-mb", type=float, default=50.0, help="largest file uploaded, in MB")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.set_defaults(func=_serve)


def _stop_on_first_sigterm(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) only ever resolves to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def page_auth(host: str, user: str, password_file: str,
              environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) for the page, or None on a loopback address without one. ConfigError for another
    address without a password, or an empty password file."""
    environ = dict(os.environ if environ is None else environ)
    password = ""
    if password_file:
        path = Path(password_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"--password-file {path}: no such file")
        password = path.read_text().strip()
        if not password:
            raise ConfigError(f"--password-file {path} is empty")
    password = password or environ.get(PASSWORD_ENV, "")
    if password:
        return user, password
    if not is_loopback(host):
        raise ConfigError(f"--host {host} lets other machines reach the page; set a password first "
                          f"(${PASSWORD_ENV} or --password-file), or leave --host at 127.0.0.1")
    return None


def _serve(args: argparse.Namespace) -> int:
    auth = page_auth(args.host, args.user, args.password_file)
    if args.max_files < 1 or args.max_file_mb <= 0:
        raise ConfigError(f"--max-files must be >= 1 and --max-file-mb > 0, got {args.max_files}, {args.max_file_mb}")
    work_dir = Path(tempfile.mkdtemp(prefix="metallo-serve-"))
    # Gradio's copies of uploads go under the work folder too (read when Gradio is imported), so stopping the
    # server removes them all.
    os.environ["GRADIO_TEMP_DIR"] = str(work_dir / "uploads")
    from metallo_core import tracking
    from metallo_core.commands.serve_inputs import ServerRoots, UploadLimits
    from metallo_core.commands.serve_page import PageOptions, build_page

    tracking.configure(create=False)
    options = PageOptions(ServerRoots(list(args.root)), UploadLimits(args.max_files, args.max_file_mb), work_dir,
                          args.model, args.device)
    # `kill` (SIGTERM) ends the server as Ctrl-C does, through the `finally` that deletes the uploads. A second
    # SIGTERM (`uv run` forwards the one it gets to this process, which `pkill` may have signalled too) must not
    # interrupt that clean-up.
    signal.signal(signal.SIGTERM, _stop_on_first_sigterm)
    try:
        build_page(options).queue().launch(
            server_name=args.host, server_port=args.port, auth=auth, max_file_size=options.limits.max_file_bytes,
            allowed_paths=[str(work_dir)], footer_links=[], show_error=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0
