"""The smallest useful handler: reply with the request itself.

Demonstrates the one method a server overloads. The request arrives with its
trailing CRLF and the reply keeps it, so the client gets back exactly the
bytes it sent (up to the first CRLF). Useful as a baseline when measuring the
framework's own overhead::

    mpreqrep serve workers.echo:EchoServer --address localhost:0
    mpreqrep request localhost:PORT "hello"    # prints: hello
"""

from __future__ import annotations

from mpreqrep import RequestServer


class EchoServer(RequestServer):
    """Replies with the request unchanged (unlike the default ``"Requested: "`` echo)."""

    def handle_request(self, request: str) -> str:
        """Return the request as the reply.

        Args:
            request: the request text, trailing CRLF included.

        Returns:
            The same text.
        """
        return request
