"""The sign-in cookie's signature and lifetime, its key, and SESSIONMGR_UI=false."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from sessionmgr.app import create_app
from sessionmgr.container import build_container
from sessionmgr.settings import ConfigError, Settings, load_settings
from sessionmgr.ui.cookie import BadCookie, CookieSigner
from sessionmgr.ui.wiring import cookie_key

KEY = b"k" * 32


def test_a_cookie_reads_back_until_it_expires() -> None:
    now = [1_000.0]
    signer = CookieSigner(KEY, 900, clock=lambda: now[0])
    value, max_age = signer.issue("a.b.c", token_exp=1_300)
    assert max_age == 300  # never past the token's exp
    signed = signer.read(value)
    assert signed.token == "a.b.c"
    assert signer.check_csrf(signed, signer.csrf(signed))
    assert not signer.check_csrf(signed, "nope")
    assert not signer.check_csrf(signed, None)
    now[0] = 1_300.0
    with pytest.raises(BadCookie, match="expired"):
        signer.read(value)


def test_another_key_or_a_changed_byte_is_refused() -> None:
    value, _ = CookieSigner(KEY, 900).issue("a.b.c")
    with pytest.raises(BadCookie, match="not one this service signed"):
        CookieSigner(b"x" * 32, 900).read(value)
    tampered = value.replace("v1.", "v1.9", 1)
    with pytest.raises(BadCookie):
        CookieSigner(KEY, 900).read(tampered)
    with pytest.raises(BadCookie):
        CookieSigner(KEY, 900).read(None)
    with pytest.raises(ValueError, match="32 bytes"):
        CookieSigner(b"short", 900)


def test_csrf_tokens_differ_per_sign_in() -> None:
    signer = CookieSigner(KEY, 900)
    first = signer.read(signer.issue("t")[0])
    second = signer.read(signer.issue("t")[0])
    assert signer.csrf(first) != signer.csrf(second)
    assert not signer.check_csrf(second, signer.csrf(first))


def test_the_key_comes_from_settings_or_the_jwt_secret() -> None:
    secret = "s" * 40
    configured = Settings(jwt_secret=secret, ui_cookie_key="u" * 40)
    assert cookie_key(configured) == cookie_key(Settings(ui_cookie_key="u" * 40))
    derived = Settings(jwt_secret=secret)
    assert cookie_key(derived) == cookie_key(Settings(jwt_secret=secret))  # every replica
    assert cookie_key(derived) != cookie_key(configured)
    random = Settings(jwt_jwks_url="https://idp.example/jwks")
    assert cookie_key(random) != cookie_key(random)  # per process
    with pytest.raises(ConfigError, match="UI_COOKIE_KEY"):
        load_settings({"SESSIONMGR_UI_COOKIE_KEY": "short", "SESSIONMGR_JWT_SECRET": secret})
    assert load_settings({"SESSIONMGR_UI": "false"}).ui is False


async def test_ui_false_removes_the_pages_not_the_assets(settings: Settings) -> None:
    off = build_container(load_settings({}, **{**_fields(settings), "ui": False}))
    async with AsyncTestClient(app=create_app(off)) as client:
        assert (await client.get("/ui/sign-in")).status_code == 404
        assert (await client.get("/static/htmx.min.js")).status_code == 200
        docs = await client.get("/schema")
        assert docs.status_code == 200
        assert "/static/redoc.standalone.js" in docs.text
        assert "https://" not in docs.text  # no CDN script, font or icon


def _fields(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__struct_fields__}
