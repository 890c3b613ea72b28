"""Where the database is: DATABASE_URL, then DB_*, then libpq's PG*, then the embedded default.

A `.env` file (the current folder's, else the project's) is read with python-dotenv and never
overrides a variable that is already set. Every secret found here is registered with
`common.output.redact`, so no output, log or journal can show it.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from common import output

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DB_VARIABLES = ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD")
PG_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSERVICE")
CONNECT_TIMEOUT_S = 5


class ConfigError(Exception):
    """Bad configuration: the runner prints it as one line and exits 2."""


@dataclass
class Target:
    mode: str  # "DATABASE_URL", "DB_*", "PG*" or "embedded"
    params: dict = field(default_factory=dict)  # libpq keywords for psycopg2.connect

    @property
    def display(self) -> str:
        """The target as a URL with the password masked."""
        return describe(self.params)


def describe(params: dict) -> str:
    """postgresql://user:***@host:port/dbname, from libpq keywords (and libpq's PG* defaults)."""
    user = params.get("user") or os.environ.get("PGUSER") or ""
    secret = params.get("password") or os.environ.get("PGPASSWORD")
    host = params.get("host") or os.environ.get("PGHOST") or "localhost"
    port = params.get("port") or os.environ.get("PGPORT") or ""
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or user
    auth = f"{user}:***@" if secret else (f"{user}@" if user else "")
    service = params.get("service") or os.environ.get("PGSERVICE")
    if service and not params.get("host"):  # the service file's host beats PGHOST: do not guess it
        return f"postgresql://{auth}/{params.get('dbname') or ''}?service={service}"
    where = f"{host}:{port}" if port and not str(host).startswith("/") else str(host)
    if str(host).startswith("/"):  # a Unix socket directory: keep it out of the authority part
        return f"postgresql://{auth}/{dbname}?host={host}"
    return f"postgresql://{auth}{where}/{dbname}"


def load_dotenv_files() -> list[str]:
    """Read .env (never overriding the environment); return warnings about unknown DB_ names."""
    from dotenv import dotenv_values, load_dotenv

    found = [p for p in (Path.cwd() / ".env", PROJECT_ROOT / ".env") if p.is_file()]
    if not found:
        return []
    path = found[0]
    load_dotenv(path, override=False)
    unknown = sorted(k for k in dotenv_values(path) if k.startswith("DB_") and k not in DB_VARIABLES)
    return [f"{path.name}: unknown variable {k} (known: {', '.join(DB_VARIABLES)})" for k in unknown]


def resolve(environ=None) -> Target:
    """Pick the target, first match wins. Raises ConfigError for a value that cannot work."""
    env = os.environ if environ is None else environ
    url = env.get("DATABASE_URL", "").strip()
    if url:
        return Target("DATABASE_URL", _parse_url(url))
    if any(env.get(k) for k in DB_VARIABLES):
        params = {
            "host": env.get("DB_HOST") or None,
            "port": env.get("DB_PORT") or None,
            "dbname": env.get("DB_NAME") or None,
            "user": env.get("DB_USER") or None,
            "password": env.get("DB_PASSWORD") or None,
        }
        if params["port"] is not None and not str(params["port"]).isdigit():
            raise ConfigError(f"DB_PORT must be a number, got {params['port']!r}")
        return Target("DB_*", _register({k: v for k, v in params.items() if v is not None}))
    if any(env.get(k) for k in PG_VARIABLES):
        if env.get("PGPASSWORD"):
            output.redact.add(env["PGPASSWORD"])
        return Target("PG*", {})  # libpq reads the PG* variables itself
    return Target("embedded", {})


def _parse_url(url: str) -> dict:
    """libpq's own parser (psycopg2's parse_dsn), so the password is what libpq will send, whatever
    '/', '#', '@' or '?' it holds; no error message echoes any part of the URL but its scheme."""
    if not re.match(r"^postgres(ql)?://", url):
        raise ConfigError("DATABASE_URL must start with postgresql:// (got " + _scheme(url) + ")")
    from psycopg2.extensions import parse_dsn

    try:
        params = parse_dsn(url)
    except Exception as exc:  # psycopg2.ProgrammingError: libpq's words, without the quoted parts
        words = re.sub(r'"[^"]*"', '"..."', str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise ConfigError("DATABASE_URL is malformed: " + words + ENCODING_HINT) from None
    _register(params)
    if any("@" in str(params.get(k) or "") for k in ("host", "port", "dbname", "hostaddr")):
        raise ConfigError("DATABASE_URL is malformed: libpq does not read it as user:password@host:port/dbname" + ENCODING_HINT)
    if params.get("port") and not re.match(r"^\d+(,\d+)*$", params["port"]):
        raise ConfigError("DATABASE_URL is malformed: the port is not a number" + ENCODING_HINT)
    return params


ENCODING_HINT = (" (in the user name and password, percent-encode '@' as %40, '/' as %2F, ':' as %3A, "
                 "'#' as %23)")


def _scheme(url: str) -> str:
    return (url.split(":", 1)[0] + ":...") if ":" in url else "no scheme"


def _register(params: dict) -> dict:
    if params.get("password"):
        output.redact.add(params["password"])
    return params


def quiet_library_warnings() -> None:
    """platformdirs warns on stderr when XDG_RUNTIME_DIR is unset (CI, containers); it is harmless."""
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    if sys.platform == "win32":
        warnings.filterwarnings("ignore", category=ResourceWarning)
