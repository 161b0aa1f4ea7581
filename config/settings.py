"""Settings, read from the environment in this one place (SPEC §11).

Code elsewhere reads ``django.conf.settings``, never ``os.environ``.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name, "").strip()
    return [item.strip() for item in raw.split(",") if item.strip()] if raw else default


def env_pair(name: str) -> tuple[str, str] | None:
    """``"A,B"`` -> ``("A", "B")``; unset -> None. Anything else is a configuration error."""
    items = env_list(name, [])
    if not items:
        return None
    if len(items) != 2:
        raise ImproperlyConfigured(
            f"{name} must be two comma-separated values, e.g. HTTP_X_FORWARDED_PROTO,https."
        )
    return items[0], items[1]


DEBUG = env_bool("DEBUG", False)
#: Fine for DEBUG on a developer's machine only: sessions, CSRF tokens and password
#: reset links signed with a published key can be forged. ``config.startup`` makes a
#: server with DEBUG off refuse to start on it.
DEVELOPMENT_SECRET_KEY = "insecure-local-development-key-change-me"  # noqa: S105
SECRET_KEY = os.environ.get("SECRET_KEY") or DEVELOPMENT_SECRET_KEY
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- Transport security (behind HTTPS, turn these on) -----------------------
# Off by default so `bash .ci/demo` works over plain http on localhost.
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# HSTS pins browsers to https for this long: 0 (off) until the site is known to
# work over https, because browsers remember it.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# Opt-in, and only behind a proxy that sets this header itself (e.g.
# "HTTP_X_FORWARDED_PROTO,https"): otherwise a client could claim https.
SECURE_PROXY_SSL_HEADER = env_pair("SECURE_PROXY_SSL_HEADER")

INSTALLED_APPS = [
    "config.apps.AdminConfig",  # django.contrib.admin, titled "Model Experiments"
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_jsonform",
    "experiments",
    "gateway",
    # The demo upstream and `manage.py demo`, apart from what serves production traffic.
    "gateway.demo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "config.static_files.AsyncWhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# PostgreSQL in production; an SQLite file for a quick local try when unset.
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    # An unreachable or silent host fails in seconds, not after the kernel's TCP timeouts
    # (minutes): token checks and /readyz answer, and the usage writer, instead of waiting
    # on a reply that never comes, falls back to its spool.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        connect_timeout=env_int("DATABASE_CONNECT_TIMEOUT", 5),
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
        tcp_user_timeout=30_000,  # ms a sent query may stay unacknowledged
    )
# Behind PgBouncer in transaction pooling mode, a cursor cannot outlive its transaction:
# QuerySet.iterator() must then read in chunks on the client instead.
DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = env_bool(
    "DATABASE_DISABLE_SERVER_SIDE_CURSORS", False
)
if os.environ.get("TEST_DATABASE_NAME"):
    # Lets several test runs share one PostgreSQL server without clashing.
    DATABASES["default"]["TEST"] = {"NAME": os.environ["TEST_DATABASE_NAME"]}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "").strip()
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {
                "PARSER_CLASS": "redis.connection._HiredisParser",
                "SOCKET_CONNECT_TIMEOUT": env_float("REDIS_CONNECT_TIMEOUT", 0.5),
                "SOCKET_TIMEOUT": env_float("REDIS_SOCKET_TIMEOUT", 0.5),
            },
            "KEY_PREFIX": os.environ.get("CACHE_KEY_PREFIX", "mx"),
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "model-experiments",
            "KEY_PREFIX": os.environ.get("CACHE_KEY_PREFIX", "mx"),
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", "") or BASE_DIR / "staticfiles")

# --- Secrets (SPEC §6) -------------------------------------------------------
# base64 of 32 random bytes; `manage.py generate_encryption_key` prints one. Every
# process (gateway, admin, manage.py in any shell) reads it the same way: the
# variable itself, else the file named by BYOK_ENCRYPTION_KEY_FILE (relative to the
# project), else var/encryption.key when it exists (where `bash .ci/demo` keeps it).
# A problem is kept, not raised: the gateway still serves ids without an experiment
# and commands that need no key still run; experiments/crypto.py refuses with it.
DEFAULT_ENCRYPTION_KEY_FILE = BASE_DIR / "var" / "encryption.key"
#: Far longer than a base64 key: a bigger file is not a key file.
MAX_KEY_FILE_BYTES = 1024


def encryption_key_source() -> tuple[str, str]:
    """(key file, or "" for the variable; where the key comes from, as messages name it)."""
    named = os.environ.get("BYOK_ENCRYPTION_KEY_FILE", "").strip()
    if named:
        path = str(BASE_DIR / named)  # relative to the project; an absolute path stays
        return path, f"the key file {path} (BYOK_ENCRYPTION_KEY_FILE)"
    if (
        not os.environ.get("BYOK_ENCRYPTION_KEY", "").strip()
        and DEFAULT_ENCRYPTION_KEY_FILE.is_file()
    ):
        return str(DEFAULT_ENCRYPTION_KEY_FILE), (
            f"the key file {DEFAULT_ENCRYPTION_KEY_FILE} (the default: neither "
            "BYOK_ENCRYPTION_KEY nor BYOK_ENCRYPTION_KEY_FILE is set)"
        )
    return "", "BYOK_ENCRYPTION_KEY"


def read_encryption_key(key_file: str, source: str) -> tuple[str, str]:
    """(key, problem): the key text, or "" and why none is usable. Never the key in the problem."""
    from_env = os.environ.get("BYOK_ENCRYPTION_KEY", "").strip()
    if not key_file:
        return from_env, ""
    if from_env:
        return "", (
            "Both BYOK_ENCRYPTION_KEY and BYOK_ENCRYPTION_KEY_FILE are set; set only one, so "
            "that every process reads the same key."
        )
    try:
        with open(key_file, "rb") as handle:
            raw = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        return "", f"Cannot read {source}: {exc.strerror or type(exc).__name__}."
    try:
        text = raw.decode("ascii").strip() if len(raw) <= MAX_KEY_FILE_BYTES else ""
    except UnicodeDecodeError:
        text = ""
    if not text:
        return (
            "",
            f"Cannot use {source}: it does not hold a base64 key (empty, binary or too long).",
        )
    return text, ""


BYOK_ENCRYPTION_KEY_FILE, BYOK_ENCRYPTION_KEY_SOURCE = encryption_key_source()
BYOK_ENCRYPTION_KEY, BYOK_ENCRYPTION_KEY_PROBLEM = read_encryption_key(
    BYOK_ENCRYPTION_KEY_FILE, BYOK_ENCRYPTION_KEY_SOURCE
)

# --- Gateway (SPEC §8) -------------------------------------------------------
GATEWAY_DEFAULT_UPSTREAM_BASE_URL = os.environ.get("GATEWAY_DEFAULT_UPSTREAM_BASE_URL", "")
GATEWAY_DEFAULT_UPSTREAM_API_KEY = os.environ.get("GATEWAY_DEFAULT_UPSTREAM_API_KEY", "")
GATEWAY_ALLOW_ANONYMOUS = env_bool("GATEWAY_ALLOW_ANONYMOUS", True)
GATEWAY_TRUSTED_PROXIES = env_int("GATEWAY_TRUSTED_PROXIES", 0)
GATEWAY_UPSTREAM_TIMEOUT = env_float("GATEWAY_UPSTREAM_TIMEOUT", 120.0)
GATEWAY_UPSTREAM_CONNECT_TIMEOUT = env_float("GATEWAY_UPSTREAM_CONNECT_TIMEOUT", 5.0)
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 16 * 1024 * 1024)
# Largest single SSE event accepted from a partner; a bigger one ends the stream (502).
GATEWAY_MAX_SSE_EVENT_BYTES = env_int("GATEWAY_MAX_SSE_EVENT_BYTES", 8 * 1024 * 1024)
# Largest non-streamed partner response (after decoding) a worker buffers; more is a 502.
GATEWAY_MAX_UPSTREAM_BODY_BYTES = env_int("GATEWAY_MAX_UPSTREAM_BODY_BYTES", 64 * 1024 * 1024)
# How often a worker confirms its routing copy against the database's routing generation:
# the bound on how long a committed routing change takes to reach every worker.
GATEWAY_MEMBERSHIP_TTL_SECONDS = env_float("GATEWAY_MEMBERSHIP_TTL_SECONDS", 1.0)
# While the database is unreachable, how long a worker keeps routing by the last state the
# database confirmed; after that it fails closed (503) for every model request.
GATEWAY_ROUTING_OUTAGE_GRACE_SECONDS = env_float("GATEWAY_ROUTING_OUTAGE_GRACE_SECONDS", 600.0)
# How long a worker trusts a verified (or unknown) token hash: the revocation delay.
GATEWAY_TOKEN_CACHE_TTL_SECONDS = env_float("GATEWAY_TOKEN_CACHE_TTL_SECONDS", 10.0)
# Durable spool for usage records the database cannot take yet (gateway/spool.py).
GATEWAY_SPOOL_DIR = Path(os.environ.get("GATEWAY_SPOOL_DIR", "") or BASE_DIR / "var" / "spool")
# Past this many bytes in the spool folder the gateway refuses model requests (503).
GATEWAY_SPOOL_MAX_BYTES = env_int("GATEWAY_SPOOL_MAX_BYTES", 1024 * 1024 * 1024)
# How often spooled records are fdatasync'ed: what a machine crash can lose.
GATEWAY_SPOOL_FSYNC_SECONDS = env_float("GATEWAY_SPOOL_FSYNC_SECONDS", 1.0)

# --- Checkpoint connection tests --------------------------------------------
# The callable that sends a checkpoint's test request. experiments never imports
# gateway; the services load this by name (the gateway's client, by default).
CHECKPOINT_CHECKER = os.environ.get("CHECKPOINT_CHECKER", "gateway.checks.check_checkpoint")
# A test waits at most this long for the partner (connect, then between reads).
CHECKPOINT_CHECK_TIMEOUT_SECONDS = env_float("CHECKPOINT_CHECK_TIMEOUT_SECONDS", 20.0)

# --- Prompt store (SPEC §9) --------------------------------------------------
PROMPT_STORE_BACKEND = os.environ.get("PROMPT_STORE_BACKEND", "local")  # local | s3
PROMPT_STORE_DIR = Path(os.environ.get("PROMPT_STORE_DIR", str(BASE_DIR / "var" / "prompts")))
PROMPT_STORE_S3_BUCKET = os.environ.get("PROMPT_STORE_S3_BUCKET", "")
PROMPT_STORE_S3_ENDPOINT_URL = os.environ.get("PROMPT_STORE_S3_ENDPOINT_URL", "")
PROMPT_STORE_S3_REGION = os.environ.get("PROMPT_STORE_S3_REGION", "auto")
PROMPT_STORE_S3_ACCESS_KEY_ID = os.environ.get("PROMPT_STORE_S3_ACCESS_KEY_ID", "")
PROMPT_STORE_S3_SECRET_ACCESS_KEY = os.environ.get("PROMPT_STORE_S3_SECRET_ACCESS_KEY", "")
PROMPT_STORE_S3_PREFIX = os.environ.get("PROMPT_STORE_S3_PREFIX", "prompts/")

# --- Export bundles (experiment_export) ---------------------------------------
# Extra regular expressions the export's redactor replaces with "[redacted]" in every
# sampled prompt and answer (customer names, internal hostnames, ticket ids...), one
# per line in the environment (a regex may contain commas).
EXPORT_REDACT_PATTERNS = [
    line.strip()
    for line in os.environ.get("EXPORT_REDACT_PATTERNS", "").splitlines()
    if line.strip()
]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
    },
}
