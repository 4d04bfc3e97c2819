#!/usr/bin/env python3
"""Verifies the DKIM signature (RFC 6376) of a received message with dkimpy,
against a public key given here instead of DNS: the tests' stand-in for the
TXT record `SELECTOR._domainkey.DOMAIN` a receiving mail server looks up.

    dkim-verify.py MESSAGE_FILE PUBLIC_KEY_PEM SELECTOR DOMAIN

Exits 0 when the signature verifies, 1 (saying why) when it does not.
Needs `dkimpy` from PyPI.
"""

import base64
import logging
import sys

import dkim


def main() -> int:
    message_file, key_file, selector, domain = sys.argv[1:5]
    with open(key_file, "rb") as f:
        pem = f.read()
    der = b"".join(line.strip() for line in pem.splitlines() if line and not line.startswith(b"-----"))
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(base64.b64decode(der))
    expected = f"{selector}._domainkey.{domain}.".encode()

    def dns(name, timeout=5):
        # Only the record the signature's own s= and d= point to exists.
        return record if name == expected else None

    with open(message_file, "rb") as f:
        message = f.read()
    logger = logging.getLogger("dkim")
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG)
    if dkim.verify(message, logger=logger, dnsfunc=dns):
        print("DKIM signature verified")
        return 0
    print("DKIM signature did not verify", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
