"""aiohttp's HTTP client, for what our own (fasthttp) does not do: HTTPS (the API server's
TokenReview and transaction reads, https targets) and the baseline engine. Made, and aiohttp
imported, on first use: a sidecar that never needs it starts without paying for it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp


class LazySession:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def client(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                auto_decompress=False,
            )
        return self._session

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return self.client().request(*args, **kwargs)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self.client().get(*args, **kwargs)

    def post(self, *args: Any, **kwargs: Any) -> Any:
        return self.client().post(*args, **kwargs)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
