"""The streaming path's per-token shortcuts keep the answers they replace: a chat chunk from its per-stream template
is byte for byte json.dumps of the chunk, and a call's inbox hands over every event the engine thread pushes, in
order, with no keep-alive wait, then the client's disconnect."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest

from llm_torch.core.engine.events import GenerationEvent
from llm_torch.core.serving import openai_api as api
from llm_torch.core.serving.server import KEEP_ALIVE, _Call, _Waker


@pytest.mark.parametrize("with_usage", [False, True])
@pytest.mark.parametrize("text", ["Hello", "", ' "quoted" \\ and\nnewline\t', "é 😀 \u2028 \x00 </script>"])
def test_the_chunk_template_writes_what_json_dumps_writes(text, with_usage):
    model = 'org/model "v2"'
    content = api.chat_content_chunk("chatcmpl-abc", model, 1700000000, with_usage)
    expected = json.dumps(api.chat_chunk("chatcmpl-abc", model, 1700000000, {"content": text}, with_usage=with_usage),
                          ensure_ascii=False)
    assert content(text) == expected


class _Engine:
    def __init__(self):
        self.cancelled = []

    def cancel(self, req):
        self.cancelled.append(req)


class _Server:
    def __init__(self):
        self.seen = []
        self.engine = _Engine()
        self.waker = _Waker()

    def observe(self, flight, event, at):
        self.seen.append(event)


class _Http:
    def __init__(self):
        self.gone = asyncio.Event()

    async def receive(self):
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_events_pushed_from_another_thread_all_arrive_in_order_then_the_disconnect():
    async def main():
        http = _Http()
        server = _Server()
        call = _Call(server, http)
        call.flights.append(SimpleNamespace(req="request"))
        n = 300

        def engine():  # bursts and gaps: some events find the stream asleep, some find it busy
            for i in range(n):
                call.arrive((0, GenerationEvent(str(i), (i,)), time.perf_counter()))
                if i % 7 == 0:
                    time.sleep(0.001)

        thread = threading.Thread(target=engine)
        t0 = time.monotonic()
        thread.start()
        got = []
        while len(got) < n:
            item = await call.next(keepalive=30.0)
            assert item is not KEEP_ALIVE
            got.append(item[1].text)
        thread.join()
        assert got == [str(i) for i in range(n)]
        assert time.monotonic() - t0 < 10  # no event waited for the keep-alive timer
        assert await call.next(keepalive=0.05) is KEEP_ALIVE
        http.gone.set()
        assert await call.next(keepalive=30.0) is None
        assert await call.next() is None  # gone stays gone
        call.close()
        assert server.engine.cancelled == ["request"] and len(server.seen) == n

    asyncio.run(main())
