"""Settings, read from the environment in this one place (SPEC §11).

Code elsewhere reads ``django.conf.settings``, never ``os.environ``.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

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


DEBUG = env_bool("DEBUG", False)
# A fixed development key is only acceptable when DEBUG is on or nothing is
# configured (local try-out); production deployments set SECRET_KEY.
SECRET_KEY = os.environ.get("SECRET_KEY") or "insecure-local-development-key-change-me"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_jsonform",
    "experiments",
    "gateway",
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
# base64 of 32 random bytes; `manage.py generate_encryption_key` prints one.
BYOK_ENCRYPTION_KEY = os.environ.get("BYOK_ENCRYPTION_KEY", "")

# --- Gateway (SPEC §8) -------------------------------------------------------
GATEWAY_DEFAULT_UPSTREAM_BASE_URL = os.environ.get("GATEWAY_DEFAULT_UPSTREAM_BASE_URL", "")
GATEWAY_DEFAULT_UPSTREAM_API_KEY = os.environ.get("GATEWAY_DEFAULT_UPSTREAM_API_KEY", "")
GATEWAY_ALLOW_ANONYMOUS = env_bool("GATEWAY_ALLOW_ANONYMOUS", True)
GATEWAY_TRUSTED_PROXIES = env_int("GATEWAY_TRUSTED_PROXIES", 0)
GATEWAY_UPSTREAM_TIMEOUT = env_float("GATEWAY_UPSTREAM_TIMEOUT", 120.0)
GATEWAY_UPSTREAM_CONNECT_TIMEOUT = env_float("GATEWAY_UPSTREAM_CONNECT_TIMEOUT", 5.0)
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 16 * 1024 * 1024)
# How often a worker confirms its routing copy against the database's routing generation:
# the bound on how long a committed routing change takes to reach every worker.
GATEWAY_MEMBERSHIP_TTL_SECONDS = env_float("GATEWAY_MEMBERSHIP_TTL_SECONDS", 1.0)
# While the database is unreachable, how long a worker keeps routing by the last state the
# database confirmed; after that it fails closed (503) for every model request.
GATEWAY_ROUTING_OUTAGE_GRACE_SECONDS = env_float("GATEWAY_ROUTING_OUTAGE_GRACE_SECONDS", 600.0)
# How long a worker trusts a verified (or unknown) token hash: the revocation delay.
GATEWAY_TOKEN_CACHE_TTL_SECONDS = env_float("GATEWAY_TOKEN_CACHE_TTL_SECONDS", 10.0)

# --- Prompt store (SPEC §9) --------------------------------------------------
PROMPT_STORE_BACKEND = os.environ.get("PROMPT_STORE_BACKEND", "local")  # local | s3
PROMPT_STORE_DIR = Path(os.environ.get("PROMPT_STORE_DIR", str(BASE_DIR / "var" / "prompts")))
PROMPT_STORE_S3_BUCKET = os.environ.get("PROMPT_STORE_S3_BUCKET", "")
PROMPT_STORE_S3_ENDPOINT_URL = os.environ.get("PROMPT_STORE_S3_ENDPOINT_URL", "")
PROMPT_STORE_S3_REGION = os.environ.get("PROMPT_STORE_S3_REGION", "auto")
PROMPT_STORE_S3_ACCESS_KEY_ID = os.environ.get("PROMPT_STORE_S3_ACCESS_KEY_ID", "")
PROMPT_STORE_S3_SECRET_ACCESS_KEY = os.environ.get("PROMPT_STORE_S3_SECRET_ACCESS_KEY", "")
PROMPT_STORE_S3_PREFIX = os.environ.get("PROMPT_STORE_S3_PREFIX", "prompts/")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        # httpx logs every upstream request at INFO: per-request noise on the gateway's hot path.
        "httpx": {"level": "WARNING"},
    },
}
