#!/usr/bin/env python3
"""An SMTP server for the tests: aiosmtpd writing every message it accepts to
a Maildir, in plain SMTP, with STARTTLS (required before MAIL), or with
implicit TLS (SMTPS), optionally demanding a login.

    smtp-sink.py --listen 127.0.0.1:2525 --maildir DIR
                 [--starttls CERT KEY | --smtps CERT KEY] [--login USER:PASSWORD]

Prints nothing; the port accepts connections once it is ready.
"""

import argparse
import asyncio
import ssl

from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--maildir", required=True)
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--starttls", nargs=2, metavar=("CERT", "KEY"))
    tls.add_argument("--smtps", nargs=2, metavar=("CERT", "KEY"))
    p.add_argument("--login", help="USER:PASSWORD the client must log in with")
    args = p.parse_args()

    host, port = args.listen.rsplit(":", 1)
    context = None
    if args.starttls or args.smtps:
        cert, key = args.starttls or args.smtps
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)

    login = None
    if args.login:
        user, password = args.login.split(":", 1)
        login = (user.encode(), password.encode())

    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == login
        return AuthResult(success=ok)

    handler = Mailbox(args.maildir)

    def smtp() -> SMTP:
        return SMTP(
            handler,
            hostname="localhost",
            tls_context=context if args.starttls else None,
            require_starttls=bool(args.starttls),
            authenticator=authenticate if login else None,
            auth_required=bool(login),
            # Under implicit TLS the whole session is encrypted already.
            auth_require_tls=not args.smtps,
        )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(smtp, host, int(port), ssl=context if args.smtps else None)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
