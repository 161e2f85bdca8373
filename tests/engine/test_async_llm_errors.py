"""The API process's side of an engine-core error (e.g. a grammar that failed to compile in the core): the
request's stream raises the reason (a 400 from the server), its other n children are aborted in the core,
and other requests carry on."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tidellm.config import EngineConfig
from tidellm.engine.async_llm import AsyncLLM
from tidellm.engine.protocol import EngineCoreOutput, EngineCoreOutputs
from tidellm.sample.params import SamplingParams, StructuredOutputsParams


class FakeClient:
    def __init__(self) -> None:
        self.ready = SimpleNamespace(max_model_len=256)
        self.is_dead, self.dead_reason = False, None
        self.sent: list = []
        self.aborted: list[list[str]] = []

    def on_dead(self, callback) -> None:
        pass

    async def add_requests(self, reqs) -> None:
        self.sent += reqs

    async def abort_requests(self, ids) -> None:
        self.aborted.append(list(ids))

    async def get_output(self):
        await asyncio.Event().wait()  # nothing arrives on its own; the test feeds _process

    async def shutdown(self, timeout: float = 10.0) -> None:
        pass


def test_core_error_fails_the_request_and_aborts_its_siblings(smollm2_tokenizer):
    async def run():
        client = FakeClient()
        llm = AsyncLLM(client, smollm2_tokenizer, 49152, EngineConfig.from_kwargs(model="smollm2-135m"))
        so = StructuredOutputsParams(regex="[0-9]+")
        bad = await llm.add_request("bad", "x", SamplingParams(n=2, max_tokens=4, structured_outputs=so))
        good = await llm.add_request("good", "y", SamplingParams(max_tokens=1))
        assert [r.request_id for r in client.sent] == ["bad-0", "bad-1", "good"]
        llm._process(
            EngineCoreOutputs(
                outputs=[
                    EngineCoreOutput("bad-1", [], finish_reason="abort", error="Invalid regex: scripted."),
                    EngineCoreOutput("good", [11], finish_reason="length"),
                ]
            )
        )
        with pytest.raises(ValueError, match="Invalid regex: scripted."):
            async for _ in bad:
                pass
        outs = [o async for o in good]
        await asyncio.sleep(0)  # let the abort go out
        await llm.shutdown()
        return client, outs

    client, outs = asyncio.run(run())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert client.aborted == [["bad-0", "bad-1"]]
