"""Settings: TOML defaults, environment overrides, and errors that name the bad key."""

from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, load_settings


def test_shipped_config_matches_the_dataclass_defaults() -> None:
    assert load_settings(None, {}) == Settings()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('port = 9000\nredis_url = "redis://127.0.0.1:1/0"\n')
    settings = load_settings(
        path,
        {
            "SSE_PORT": "9100",
            "SSE_REQUIRE_ISSUED_SESSION": "yes",
            "SSE_SESSION_TTL_S": "2.5",
            "SSE_CORS_ORIGINS": "https://a.example, https://b.example",
            "OTHER": "ignored",
        },
    )
    assert settings.port == 9100
    assert settings.redis_url == "redis://127.0.0.1:1/0"
    assert settings.require_issued_session is True
    assert settings.session_ttl_s == 2.5
    assert settings.cors_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"SSE_PORT": "eighty"}, "'port' (from SSE_PORT) must be an integer"),
        ({"SSE_PORT": "70000"}, "'port' must be at most 65535"),
        ({"SSE_SESSION_TTL_S": "0"}, "'session_ttl_s' must be positive"),
        ({"SSE_REQUIRE_ISSUED_SESSION": "maybe"}, "'require_issued_session'"),
        ({"SSE_PRODUCER": "sometimes"}, "'producer' must be"),
        ({"SSE_REDIS_URL": "http://x"}, "'redis_url' must be"),
        ({"SSE_NO_SUCH_KEY": "1"}, "unknown setting 'no_such_key'"),
        ({"SSE_REPLAY_READS": "2"}, "'replay_reads' must leave a Redis connection"),
        ({"SSE_REPLAY_READS": "0"}, "'replay_reads' must be at least 1"),
        ({"SSE_WRITE_TIMEOUT_S": "0"}, "'write_timeout_s' must be positive"),
        ({"SSE_IDEMPOTENCY_TTL_S": "-1"}, "'idempotency_ttl_s' must be positive"),
    ],
)
def test_bad_values_name_the_key(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_settings(None, environ)


def test_bad_toml_types_and_keys_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('heartbeat_interval_s = "soon"\n')
    with pytest.raises(SettingsError, match="'heartbeat_interval_s' must be a number"):
        load_settings(path, {})
    path.write_text("colour = 1\n")
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        load_settings(path, {})
    path.write_text("port = [")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(path, {})


def test_tokens_never_appear_in_errors_or_repr() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(None, {"SSE_PUBLISH_TOKENS": "short-secret"})
    assert "short-secret" not in str(caught.value)
    settings = load_settings(None, {"SSE_PUBLISH_TOKENS": "a-long-enough-secret-token"})
    assert settings.publish_tokens == ("a-long-enough-secret-token",)
    assert "a-long-enough-secret-token" not in repr(settings)
