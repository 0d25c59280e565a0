"""OpenSSL cipher suite names -> IANA names, for OpenTelemetry's ``tls.cipher``.

mitmproxy reports the cipher as OpenSSL names it (``SSL_CIPHER_get_name``);
the semantic conventions want the IANA registry name. TLS 1.3 suites already
carry it (``TLS_AES_128_GCM_SHA256``); TLS 1.2 and older need this table. It
holds every certificate-based suite of OpenSSL 3's DEFAULT list (no PSK, SRP
or anonymous suites, which mitmproxy does not negotiate), each with its IANA
code point so that a test can check the table against the OpenSSL at hand.
"""

from __future__ import annotations

from typing import Final

__all__ = ["IANA_CIPHERS", "iana_cipher"]

IANA_CIPHERS: Final[dict[str, tuple[int, str]]] = {
    # ECDHE with AEAD
    "ECDHE-ECDSA-AES128-GCM-SHA256": (0xC02B, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
    "ECDHE-ECDSA-AES256-GCM-SHA384": (0xC02C, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
    "ECDHE-RSA-AES128-GCM-SHA256": (0xC02F, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
    "ECDHE-RSA-AES256-GCM-SHA384": (0xC030, "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"),
    "ECDHE-ECDSA-CHACHA20-POLY1305": (0xCCA9, "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
    "ECDHE-RSA-CHACHA20-POLY1305": (0xCCA8, "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
    # DHE with AEAD
    "DHE-RSA-AES128-GCM-SHA256": (0x009E, "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256"),
    "DHE-RSA-AES256-GCM-SHA384": (0x009F, "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384"),
    "DHE-RSA-CHACHA20-POLY1305": (0xCCAA, "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
    # ECDHE and DHE with CBC
    "ECDHE-ECDSA-AES128-SHA256": (0xC023, "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256"),
    "ECDHE-ECDSA-AES256-SHA384": (0xC024, "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384"),
    "ECDHE-RSA-AES128-SHA256": (0xC027, "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256"),
    "ECDHE-RSA-AES256-SHA384": (0xC028, "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384"),
    "ECDHE-ECDSA-AES128-SHA": (0xC009, "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA"),
    "ECDHE-ECDSA-AES256-SHA": (0xC00A, "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA"),
    "ECDHE-RSA-AES128-SHA": (0xC013, "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"),
    "ECDHE-RSA-AES256-SHA": (0xC014, "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"),
    "DHE-RSA-AES128-SHA256": (0x0067, "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256"),
    "DHE-RSA-AES256-SHA256": (0x006B, "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256"),
    "DHE-RSA-AES128-SHA": (0x0033, "TLS_DHE_RSA_WITH_AES_128_CBC_SHA"),
    "DHE-RSA-AES256-SHA": (0x0039, "TLS_DHE_RSA_WITH_AES_256_CBC_SHA"),
    # static RSA key exchange
    "AES128-GCM-SHA256": (0x009C, "TLS_RSA_WITH_AES_128_GCM_SHA256"),
    "AES256-GCM-SHA384": (0x009D, "TLS_RSA_WITH_AES_256_GCM_SHA384"),
    "AES128-SHA256": (0x003C, "TLS_RSA_WITH_AES_128_CBC_SHA256"),
    "AES256-SHA256": (0x003D, "TLS_RSA_WITH_AES_256_CBC_SHA256"),
    "AES128-SHA": (0x002F, "TLS_RSA_WITH_AES_128_CBC_SHA"),
    "AES256-SHA": (0x0035, "TLS_RSA_WITH_AES_256_CBC_SHA"),
}
"""OpenSSL name -> (IANA code point, IANA name)."""


def iana_cipher(openssl_name: str) -> str | None:
    """The IANA name of a cipher suite OpenSSL calls ``openssl_name``; None if unknown.

    TLS 1.3 suites are named alike by both (``TLS_...``) and pass through.
    """
    if openssl_name.startswith("TLS_"):
        return openssl_name
    entry = IANA_CIPHERS.get(openssl_name)
    return entry[1] if entry is not None else None
