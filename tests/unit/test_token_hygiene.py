"""Tokens that verify but carry odd claims: each is a 401 with a reason, never a 500."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import pytest

from sessionmgr.api.auth import TokenVerifier
from sessionmgr.domain.errors import AuthenticationFailed
from tests.unit.test_auth import SECRET, claims, forge, hs_verifier, refused


def signed_raw(payload: str, secret: str = SECRET) -> str:
    """An HS256 token around a payload given as raw JSON text (repeated keys, huge numbers)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(payload.encode())
    sig = hmac.new(secret.encode(), head.encode(), hashlib.sha256).digest()
    return head + "." + b64(sig)


def hs(payload: dict[str, Any]) -> str:
    return forge({"alg": "HS256", "typ": "JWT"}, payload, sign=SECRET.encode())


@pytest.mark.parametrize(
    "raw_exp", ["1" + "0" * 309, "1e309", "-1", "99999999999999999999", "Infinity", "NaN", "true"]
)
async def test_an_absurd_exp_is_a_401(raw_exp: str) -> None:
    now = int(time.time())
    token = signed_raw(f'{{"sub":"alice","iat":{now},"exp":{raw_exp}}}')
    await refused(hs_verifier(), token, "exp|not JSON|malformed")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
@pytest.mark.parametrize("raw", ["1" + "0" * 309, "1e309", "-5", '"soon"'])
async def test_an_absurd_nbf_or_iat_is_a_401(claim: str, raw: str) -> None:
    now = int(time.time())
    token = signed_raw(f'{{"sub":"alice","exp":{now + 300},"{claim}":{raw}}}')
    await refused(hs_verifier(), token, f"{claim} claim is invalid")


async def test_a_fractional_exp_is_still_a_date() -> None:
    principal = await hs_verifier().verify(f"Bearer {hs(claims(exp=time.time() + 300.5))}")
    assert principal.sub == "mad:alice"


async def test_a_repeated_key_in_the_payload_is_refused() -> None:
    now = int(time.time())
    token = signed_raw(f'{{"sub":"bob","roles":[],"roles":["admin"],"exp":{now + 300}}}')
    await refused(hs_verifier(), token, "repeats a key")


async def test_a_repeated_key_inside_a_nested_claim_is_refused_too() -> None:
    now = int(time.time())
    token = signed_raw(f'{{"sub":"bob","ext":{{"a":1,"a":2}},"exp":{now + 300}}}')
    await refused(hs_verifier(), token, "repeats a key")


@pytest.mark.parametrize(
    "sub",
    [
        "alice\r\nX-Admin: 1",
        "alice\n",
        "ali\x00ce",
        "alice\u202egnp.exe",
        "al\u200bice",
        "a\u2028b",
    ],
)
async def test_a_sub_with_control_or_bidi_characters_is_refused(sub: str) -> None:
    await refused(hs_verifier(), hs(claims(sub=sub)), "printable")


async def test_a_sub_with_ordinary_unicode_and_spaces_is_fine() -> None:
    principal = await hs_verifier().verify(f"Bearer {hs(claims(sub='José Müller'))}")
    assert principal.sub == "José Müller"


async def test_without_settings_iat_is_optional_and_lifetime_unbounded() -> None:
    now = int(time.time())
    token = hs({"sub": "alice", "exp": now + 10 * 365 * 86_400})
    assert (await hs_verifier().verify(f"Bearer {token}")).sub == "alice"


async def test_iat_can_be_required() -> None:
    verifier = hs_verifier(jwt_require_iat="true")
    await refused(verifier, hs({"sub": "alice", "exp": int(time.time()) + 60}), "no iat claim")
    assert (await verifier.verify(f"Bearer {hs(claims())}")).sub == "mad:alice"


async def test_a_token_living_longer_than_the_maximum_is_refused() -> None:
    verifier = hs_verifier(jwt_max_lifetime_s="3600")
    now = int(time.time())
    await refused(verifier, hs(claims(iat=now, exp=now + 3601)), "longer than 3600 s")
    await refused(verifier, hs({"sub": "alice", "exp": now + 60}), "no iat claim")
    ok = await verifier.verify(f"Bearer {hs(claims(iat=now, exp=now + 3600))}")
    assert ok.sub == "mad:alice"


async def test_a_refused_token_is_not_remembered() -> None:
    verifier: TokenVerifier = hs_verifier()
    token = hs(claims(sub="bad\nsub"))
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            await verifier.verify(f"Bearer {token}")
