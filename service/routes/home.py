"""The landing page at / (model, version, where to go next) and the favicon. Open, like /health."""

from __future__ import annotations

import html
import json
from pathlib import Path
from string import Template

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse

from service.routes.ops import package_version
from service.state import ServerState, get_state

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
_PAGE = Template((STATIC / "home.html").read_text())
FAVICON = STATIC / "favicon.svg"


def _model_state(state: ServerState) -> tuple[str, str]:
    """(css state, words) for the model's row."""
    if state.load_error is not None:
        return "failed", f"failed to load: {state.load_error}"
    if state.loaded is None:
        return "loading", "loading (/ready answers 503 until it is served)"
    if state.draining:
        return "loading", "shutting down"
    return "ready", "ready"


@router.get("/", response_class=HTMLResponse)
async def home(request: Request, state: ServerState = Depends(get_state)) -> HTMLResponse:
    css_state, words = _model_state(state)
    keyed = bool(state.settings.api_keys)
    values = {
        "version": package_version(),
        "model": state.model_name,
        "model_json": json.dumps(state.model_name)[1:-1],
        "state": css_state,
        "state_text": words,
        "context": f"{state.loaded.max_model_len} tokens" if state.loaded is not None else "known once loaded",
        "key_note": " (needs the API key: Authorization: Bearer KEY)" if keyed else "",
        "key_header": " -H 'Authorization: Bearer KEY'" if keyed else "",
        "base": str(request.base_url).rstrip("/"),
    }
    return HTMLResponse(_PAGE.substitute({name: html.escape(value) for name, value in values.items()}))


# Browsers ask for /favicon.ico unless a page names another icon; an SVG answers both (Chromium, Firefox, Safari).
@router.get("/favicon.ico")
@router.get("/favicon.svg")
async def favicon() -> FileResponse:
    return FileResponse(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})
