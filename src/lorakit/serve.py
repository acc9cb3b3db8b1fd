"""An OpenAI-compatible HTTP server: one base model, many adapters, one adapter per request.

    lorakit serve --model M --adapter sql=runs/sql --adapter chat=runs/chat [--api-key KEY]

Routes: ``GET /health``, ``GET /v1/models`` (the base and each adapter with its ``parent``),
``POST /v1/completions`` and ``POST /v1/chat/completions`` (``"model"`` is an adapter name or the
base name; ``stream: true`` sends server-sent events), and, only with ``allow_adapter_updates``,
vLLM's ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` for paths inside
``adapter_root``. Requests for different adapters share forward passes (``lorakit.engine``).
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with its statuses.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.engine import Engine, request_id, resolve_inside
from lorakit.engine import Request as EngineRequest
from lorakit.generate import SamplingOptions, chat_input_ids
from lorakit.pool import AdapterPool


class APIError(Exception):
    """An error returned to the client as OpenAI does: status, message, type, param and code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)


class Server:
    """The model, its adapter pool and engine, and what the routes need to know."""

    def __init__(self, model: Any, tokenizer: Any, base_name: str, adapters: dict[str, str] | None = None, *,
                 api_key: str | None = None, allow_adapter_updates: bool = False, adapter_root: str | None = None,
                 max_batch: int = 64, max_loaded: int = 16, default_max_tokens: int = 256) -> None:
        self.tokenizer, self.base_name, self.api_key = tokenizer, base_name, api_key
        self.allow_updates = allow_adapter_updates
        self.root = Path(adapter_root) if adapter_root else None
        self.default_max_tokens = default_max_tokens
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.pool = AdapterPool(model, max_loaded=max_loaded)
        for name, path in (adapters or {}).items():
            self.pool.register(name, path)
        self.engine = Engine(model, tokenizer, self.pool, max_batch=max_batch)
        self.created = int(time.time())
        self.tokenizer_lock = threading.Lock()

    # -- request handling --------------------------------------------------------------------------

    def adapter_for(self, model_name: str) -> str | None:
        if model_name == self.base_name:
            return None
        if model_name in self.pool.paths:
            return model_name
        raise APIError(404, f"The model `{model_name}` does not exist. Available: "
                            f"{', '.join([self.base_name, *sorted(self.pool.paths)])}", param="model",
                       code="model_not_found")

    def encode(self, body: CompletionRequest | ChatRequest) -> list[int]:
        with self.tokenizer_lock:
            if isinstance(body, ChatRequest):
                ids = chat_input_ids(self.tokenizer, [m.model_dump() for m in body.messages])[0].tolist()
            elif isinstance(body.prompt, list):
                ids = body.prompt
            else:
                ids = self.tokenizer(body.prompt)["input_ids"]
        return list(ids)

    def options(self, body: CompletionRequest | ChatRequest, prompt_len: int) -> SamplingOptions:
        max_tokens = (getattr(body, "max_completion_tokens", None) or body.max_tokens
                      or self.default_max_tokens)
        if self.context is not None:
            if prompt_len >= self.context:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt "
                                    f"has {prompt_len}. Shorten the prompt.", param="messages",
                               code="context_length_exceeded")
            if prompt_len + max_tokens > self.context:
                if body.max_tokens is not None or getattr(body, "max_completion_tokens", None) is not None:
                    raise APIError(400, f"This model's maximum context length is {self.context} tokens; "
                                        f"{prompt_len} in the prompt + {max_tokens} max_tokens is more. Lower "
                                        f"max_tokens.", param="max_tokens", code="context_length_exceeded")
                max_tokens = self.context - prompt_len
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingOptions(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                               stop=stop, seed=body.seed)

    def start(self, body: CompletionRequest | ChatRequest) -> tuple[EngineRequest, asyncio.Queue, int]:
        adapter = self.adapter_for(body.model)
        ids = self.encode(body)
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        options = self.options(body, len(ids))
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        req = EngineRequest(ids, adapter, options, lambda item: loop.call_soon_threadsafe(out.put_nowait, item))
        self.engine.submit(req)
        return req, out, len(ids)

    # -- adapters ----------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> None:
        if self.root is None:
            raise APIError(400, "the server was started without --adapter-root; adapters cannot be loaded")
        if name == self.base_name or name in self.pool.paths:
            raise APIError(400, f"an adapter or model named {name!r} already exists; unload it first",
                           param="lora_name")
        try:
            target = resolve_inside(self.root, path)
        except ValueError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        try:
            self.engine.call(lambda: self.pool.register(name, target))
        except Exception as exc:  # the adapter's own problem: missing files, pickle, rank, targets
            raise APIError(400, f"cannot load adapter {name!r}: {exc}", param="lora_path") from None

    def unload_adapter(self, name: str) -> None:
        if name not in self.pool.paths:
            raise APIError(404, f"no adapter named {name!r}", param="lora_name", code="model_not_found")
        try:
            self.engine.call(lambda: self.pool.unregister(name))
        except Exception as exc:
            raise APIError(400, str(exc), param="lora_name") from None

    def models(self) -> dict[str, Any]:
        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "lorakit", "root": root,
                    "parent": parent}
        data = [card(self.base_name, self.base_name, None)]
        data += [card(n, str(p), self.base_name) for n, p in sorted(self.pool.paths.items())]
        return {"object": "list", "data": data}


def create_app(server: Server) -> FastAPI:
    """The FastAPI app for ``server``; the engine starts and stops with the app."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not server.engine.thread.is_alive():
            server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        needs_key = server.api_key and request.url.path.startswith("/v1/")
        if needs_key and request.headers.get("authorization", "") != f"Bearer {server.api_key}":
            return APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.",
                            code="invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{first.get('msg', 'invalid request')}" + (f" (at {where})" if where else "")
        return APIError(400, message, param=where, code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                        ).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": len(server.engine.rows)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await _respond(server, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        return await _respond(server, body, chat=True)

    if server.allow_updates:
        @app.post("/v1/load_lora_adapter")
        async def load(body: LoadAdapterRequest) -> dict[str, str]:
            await run_in_threadpool(server.load_adapter, body.lora_name, body.lora_path)
            return {"status": "ok", "message": f"adapter {body.lora_name!r} loaded"}

        @app.post("/v1/unload_lora_adapter")
        async def unload(body: UnloadAdapterRequest) -> dict[str, str]:
            await run_in_threadpool(server.unload_adapter, body.lora_name)
            return {"status": "ok", "message": f"adapter {body.lora_name!r} unloaded"}

    return app


async def _respond(server: Server, body: CompletionRequest | ChatRequest, chat: bool) -> Any:
    req, out, prompt_tokens = server.start(body)
    rid = request_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_sse(req, out, rid, created, body.model, chat), media_type="text/event-stream")
    parts: list[str] = []
    while True:
        kind, value = await out.get()
        if kind == "text":
            parts.append(value)
        elif kind == "error":
            raise APIError(500, value, type_="server_error")
        else:
            break
    text = "".join(parts)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": value["completion_tokens"],
             "total_tokens": prompt_tokens + value["completion_tokens"]}
    choice: dict[str, Any] = {"index": 0, "finish_reason": value["finish_reason"]}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": [choice], "usage": usage}


async def _sse(req: EngineRequest, out: asyncio.Queue, rid: str, created: int, model: str,
               chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk with the finish reason and usage,
    then ``data: [DONE]``."""
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False, usage: dict | None = None) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body: dict[str, Any] = {"id": rid, "object": kind_name, "created": created, "model": model,
                                "choices": [choice]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk(None, None, first=True)
        while True:
            kind, value = await out.get()
            if kind == "text":
                yield chunk(value, None)
            elif kind == "error":
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                break
            else:
                usage = {"prompt_tokens": len(req.ids), "completion_tokens": value["completion_tokens"],
                         "total_tokens": len(req.ids) + value["completion_tokens"]}
                yield chunk(None, value["finish_reason"], usage=usage)
                break
        yield "data: [DONE]\n\n"
    finally:
        req.cancelled = True  # a client that went away frees its row at the next step


def serve(model: Any, tokenizer: Any, base_name: str, adapters: dict[str, str], host: str = "127.0.0.1",
          port: int = 8000, **options: Any) -> None:
    """Run the server until interrupted (uvicorn, one process)."""
    import uvicorn

    app = create_app(Server(model, tokenizer, base_name, adapters, **options))
    uvicorn.run(app, host=host, port=port, log_level="info")
