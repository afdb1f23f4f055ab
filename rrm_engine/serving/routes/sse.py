"""Server-sent events: a stream of JSON chunks, then "data: [DONE]"."""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse


class _EventStream(StreamingResponse):
    def __init__(self, content: AsyncIterator[str], on_end: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream")
        self._on_end = on_end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()


def sse(chunks: AsyncIterator[dict], on_end: Callable[[], None]) -> StreamingResponse:
    """The chunks as events; an error after the 200 header is reported in the stream, as OpenAI does.
    on_end runs once the response is over, however it ended."""
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except Exception as e:
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': type(e).__name__}})}\n\n"
        yield "data: [DONE]\n\n"

    return _EventStream(events(), on_end)
