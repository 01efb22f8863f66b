"""Optional OIDC/JWT bearer tokens (PyJWT with the issuer's JWKS), for teams whose identities live in SSO.

The JWKS is fetched from ``EDITQ_OIDC_JWKS_URL`` (cached by PyJWKClient); tokens must be signed with an
asymmetric algorithm, unexpired, and match the configured issuer and audience. The granted scopes are read from
``EDITQ_OIDC_SCOPE_CLAIM`` (a space-separated string or a list); unknown scope names are ignored.
"""

from __future__ import annotations

import jwt

from controller.security.keys import Scope
from shared.settings import Settings

ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


class TokenError(Exception):
    """The token is not acceptable (the message says why, without echoing the token)."""


class OidcVerifier:
    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_jwks_url
        self.jwks = jwt.PyJWKClient(settings.oidc_jwks_url, timeout=5)
        self.issuer = settings.oidc_issuer
        self.audience = settings.oidc_audience
        self.scope_claim = settings.oidc_scope_claim

    def verify(self, token: str) -> tuple[str, set[Scope]]:
        """The token's subject and granted scopes; blocking (JWKS fetch), call it off the event loop."""
        try:
            signing_key = self.jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token, signing_key.key, algorithms=ALGORITHMS, audience=self.audience, issuer=self.issuer,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.PyJWTError as err:
            raise TokenError(str(err)) from None
        raw = claims.get(self.scope_claim, "")
        names = raw.split() if isinstance(raw, str) else list(raw) if isinstance(raw, list) else []
        known = {s.value for s in Scope}
        return str(claims["sub"]), {Scope(n) for n in names if n in known}
