"""settings.py: defaults, and a start-up refusal that names the variable for each bad value."""

from __future__ import annotations

from typing import Any

import pytest

from sessionmgr.settings import (
    ConfigError,
    Settings,
    effective_algorithms,
    load_settings,
    require_jwt,
    unknown_variables,
)

SECRET = "s" * 32
PEM = "-----BEGIN PUBLIC KEY-----\nMFkw...\n-----END PUBLIC KEY-----"


def env(**values: str) -> dict[str, str]:
    return {f"SESSIONMGR_{name.upper()}": value for name, value in values.items()}


def test_defaults_follow_the_design() -> None:
    s = load_settings({})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.mongodb_db == "sessionmgr"
    assert s.lease_ttl_s == 30
    assert s.recent_timeline == 20
    assert s.page_size_default <= s.page_size_max
    assert s.jwt_leeway_s <= 60
    assert s.log_level == "INFO"
    assert not s.jwt_configured
    assert not s.mongodb_in_memory


def test_the_process_environment_is_read_when_none_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SESSIONMGR_LEASE_TTL_S", "45")
    monkeypatch.setenv("SESSIONMGR_MONGODB_URI", "mongomock://")
    s = load_settings()
    assert s.lease_ttl_s == 45
    assert s.mongodb_in_memory


def test_values_are_parsed_and_trimmed() -> None:
    s = load_settings(
        env(
            redis_url=" rediss://cache:6380/1 ",
            redis_socket_timeout_s="0.25",
            lease_ttl_s="60",
            jwt_algorithms="hs256, HS512",
            jwt_secret=SECRET,
            log_level="debug",
            s3_endpoint_url="https://s3.local",
        )
    )
    assert s.redis_url == "rediss://cache:6380/1"
    assert s.redis_socket_timeout_s == 0.25
    assert s.lease_ttl_s == 60
    assert s.jwt_algorithms == ("HS256", "HS512")
    assert s.log_level == "DEBUG"
    assert s.s3_endpoint_url == "https://s3.local"


def test_empty_variables_mean_the_default() -> None:
    assert load_settings(env(lease_ttl_s="", redis_url="")) == Settings()


def test_overrides_win_over_the_environment() -> None:
    s = load_settings(env(lease_ttl_s="10"), lease_ttl_s=99)
    assert s.lease_ttl_s == 99


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("redis_url", "http://x"),
        ("redis_url", "localhost:6379"),
        ("mongodb_uri", "postgres://db"),
        ("s3_endpoint_url", "ftp://s3"),
        ("s3_bucket", "Archive_Bucket"),
        ("s3_bucket", "ab"),
        ("s3_bucket", "a..b"),
        ("s3_ca_bundle", "/no/such/ca.pem"),
        ("s3_timeout_s", "0"),
        ("s3_timeout_s", "61"),
        ("jwt_jwks_url", "file:///etc/jwks.json"),
        ("lease_ttl_s", "abc"),
        ("lease_ttl_s", "0"),
        ("lease_ttl_s", "-5"),
        ("lease_ttl_s", "3601"),
        ("redis_socket_timeout_s", "nan"),
        ("redis_socket_timeout_s", "0"),
        ("jwt_leeway_s", "61"),
        ("page_size_max", "1.5"),
        ("max_body_bytes", "10"),
        ("jwt_algorithms", "none"),
        ("jwt_algorithms", "HS256,RS256"),
        ("jwt_algorithms", "ES256,HS512"),
        ("jwt_algorithms", " , "),
        ("log_level", "LOUD"),
        ("log_level", "TRACE"),
        ("breaker_failures", "0"),
        ("breaker_reset_s", "soon"),
        ("retry_attempts", "11"),
        ("retry_timeout_s", "0"),
        ("rate_limit_per_s", "-1"),
        ("rate_limit_burst", "0"),
        ("shutdown_grace_s", "0"),
        ("gc_freeze", "maybe"),
        ("lease_grace_s", "-1"),
        ("lease_grace_s", "soon"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    var = f"SESSIONMGR_{name.upper()}"
    with pytest.raises(ConfigError, match=var):
        load_settings(env(**{name: value}))


def test_the_none_algorithm_is_refused_with_a_reason() -> None:
    with pytest.raises(ConfigError, match="'none' is never allowed"):
        load_settings(env(jwt_algorithms="none"))


def test_mixed_algorithm_families_are_refused_with_a_reason() -> None:
    with pytest.raises(ConfigError, match="do not mix"):
        load_settings(env(jwt_algorithms="HS256,RS256", jwt_public_key=PEM))


@pytest.mark.parametrize(
    "sources",
    [
        {"jwt_secret": SECRET, "jwt_public_key": PEM},
        {"jwt_secret": SECRET, "jwt_jwks_url": "https://idp/jwks"},
        {"jwt_public_key": PEM, "jwt_jwks_url": "https://idp/jwks"},
    ],
)
def test_only_one_jwt_source_at_a_time(sources: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="set only one of") as caught:
        load_settings(env(**sources))
    for name in sources:
        assert f"SESSIONMGR_{name.upper()}" in str(caught.value)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="SESSIONMGR_JWT_SECRET"):
        load_settings(env(jwt_secret="s" * 31))
    assert load_settings(env(jwt_secret=SECRET)).jwt_secret == SECRET


def test_algorithms_must_fit_the_key_kind() -> None:
    with pytest.raises(ConfigError, match="SESSIONMGR_JWT_ALGORITHMS"):
        load_settings(env(jwt_secret=SECRET, jwt_algorithms="RS256"))
    with pytest.raises(ConfigError, match="SESSIONMGR_JWT_ALGORITHMS"):
        load_settings(env(jwt_public_key=PEM, jwt_algorithms="HS256"))
    with pytest.raises(ConfigError, match="SESSIONMGR_JWT_ALGORITHMS"):
        load_settings(env(jwt_jwks_url="https://idp/jwks", jwt_algorithms="HS384"))


def test_page_default_may_not_exceed_the_maximum() -> None:
    with pytest.raises(ConfigError, match="SESSIONMGR_PAGE_SIZE_DEFAULT"):
        load_settings(env(page_size_default="50", page_size_max="10"))
    s = load_settings(env(page_size_default="10", page_size_max="10"))
    assert s.page_size_default == s.page_size_max == 10


def test_require_jwt_refuses_to_serve_without_a_key() -> None:
    with pytest.raises(ConfigError, match="SESSIONMGR_JWT_SECRET"):
        require_jwt(load_settings({}))
    for source in (
        {"jwt_secret": SECRET},
        {"jwt_public_key": PEM},
        {"jwt_jwks_url": "https://idp/jwks"},
    ):
        require_jwt(load_settings(env(**source)))


def test_effective_algorithms() -> None:
    assert effective_algorithms(load_settings(env(jwt_secret=SECRET))) == ("HS256",)
    assert effective_algorithms(load_settings(env(jwt_public_key=PEM))) == ("RS256", "ES256")
    chosen = load_settings(env(jwt_secret=SECRET, jwt_algorithms="HS512"))
    assert effective_algorithms(chosen) == ("HS512",)


def test_unknown_variables_names_the_typos_only() -> None:
    environ = {
        "SESSIONMGR_LEASE_TIME": "5",
        "SESSIONMGR_LEASE_TTL_S": "5",
        "SESSIONMGR_TEST_MONGODB_URI": "mongodb://x",
        "OTHER": "1",
    }
    assert unknown_variables(environ) == ["SESSIONMGR_LEASE_TIME"]


def test_a_number_that_is_not_one_says_what_it_must_be() -> None:
    with pytest.raises(ConfigError, match=r"SESSIONMGR_LEASE_TTL_S.*whole number between 1 and"):
        load_settings({"SESSIONMGR_LEASE_TTL_S": "abc"})


def test_resilience_settings_are_read() -> None:
    settings = load_settings(
        env(
            breaker_failures="3",
            breaker_reset_s="0.5",
            retry_attempts="2",
            retry_timeout_s="1",
            rate_limit_per_s="0",
            rate_limit_burst="7",
            shutdown_grace_s="5",
        )
    )
    assert (settings.breaker_failures, settings.breaker_reset_s) == (3, 0.5)
    assert (settings.retry_attempts, settings.retry_timeout_s) == (2, 1.0)
    assert (settings.rate_limit_per_s, settings.rate_limit_burst) == (0.0, 7)
    assert settings.shutdown_grace_s == 5


def test_s3_settings_are_read(tmp_path: Any) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = load_settings(
        env(
            s3_bucket="team.archive-1",
            s3_endpoint_url="https://s3.internal:9000",
            s3_region="eu-central-1",
            s3_ca_bundle=str(ca),
            s3_timeout_s="2.5",
        )
    )
    assert (settings.s3_bucket, settings.s3_endpoint_url) == (
        "team.archive-1",
        "https://s3.internal:9000",
    )
    assert (settings.s3_region, settings.s3_ca_bundle, settings.s3_timeout_s) == (
        "eu-central-1",
        str(ca),
        2.5,
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("false", False), ("0", False), ("Off", False), ("TRUE", True), ("1", True)],
)
def test_gc_freeze_reads_the_usual_spellings(raw: str, expected: bool) -> None:
    assert load_settings(env(gc_freeze=raw)).gc_freeze is expected
    assert load_settings(env()).gc_freeze is True


def test_sentinels_are_host_port_pairs_with_a_master_name() -> None:
    s = load_settings(
        env(
            redis_sentinels=" 10.0.0.1:26379, sentinel-b:26380 ,[::1]:26381",
            redis_sentinel_master="sessionmgr",
            redis_sentinel_tls="true",
        )
    )
    assert s.redis_sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381))
    assert (s.redis_sentinel_master, s.redis_sentinel_tls) == ("sessionmgr", True)
    assert load_settings({}).redis_sentinels == ()


@pytest.mark.parametrize("value", ["host", "host:", ":26379", "host:port", "h:1,", "h:70000"])
def test_a_bad_sentinel_address_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="SESSIONMGR_REDIS_SENTINELS"):
        load_settings(env(redis_sentinels=value, redis_sentinel_master="m"))


@pytest.mark.parametrize(
    ("values", "missing"),
    [
        ({"redis_sentinels": "h:26379"}, "SESSIONMGR_REDIS_SENTINEL_MASTER"),
        ({"redis_sentinel_master": "m"}, "SESSIONMGR_REDIS_SENTINELS"),
    ],
)
def test_sentinels_and_their_master_name_come_together(
    values: dict[str, str], missing: str
) -> None:
    with pytest.raises(ConfigError, match=missing):
        load_settings(env(**values))


def test_the_lease_grace_period_and_participants_role_are_read() -> None:
    settings = load_settings(env(lease_grace_s="0", participants_role="coordinator"))
    assert (settings.lease_grace_s, settings.participants_role) == (0, "coordinator")
    assert (load_settings(env()).lease_grace_s, load_settings(env()).participants_role) == (
        300,
        None,
    )


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("1800", 1800), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86_400), ("45M", 2700)],
)
def test_idle_suspend_after_takes_seconds_or_a_duration(raw: str, seconds: int) -> None:
    assert load_settings({"SESSIONMGR_IDLE_SUSPEND_AFTER": raw}).idle_suspend_after == seconds


@pytest.mark.parametrize("raw", ["0", "30 min", "-5m", "1.5h", "31d", "m"])
def test_idle_suspend_after_refuses_what_is_not_a_duration(raw: str) -> None:
    with pytest.raises(ConfigError, match="SESSIONMGR_IDLE_SUSPEND_AFTER"):
        load_settings({"SESSIONMGR_IDLE_SUSPEND_AFTER": raw})


def test_idle_sweep_defaults() -> None:
    settings = load_settings({})
    assert (settings.idle_suspend_after, settings.idle_sweep) == (1800, True)
