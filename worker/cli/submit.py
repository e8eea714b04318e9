"""``genq submit``: one chat request, its id or (``--wait``) its result."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

from worker.cli.common import JsonOpt, app, errors, get_client, show


@app.command()
def submit(text: str,
           system: Annotated[str | None, typer.Option(help="System message.")] = None,
           max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 256,
           temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
           seed: Annotated[int | None, typer.Option(help="Seed of the sampling.")] = None,
           n: Annotated[int, typer.Option("-n", help="Samples to generate (1-16).")] = 1,
           json_schema: Annotated[Path | None, typer.Option(
               help="Constrain the output to the JSON schema in this file.")] = None,
           json_object: Annotated[bool, typer.Option(
               "--json-object", help="Constrain the output to a JSON object.")] = False,
           regex: Annotated[str | None, typer.Option(
               help="Constrain the output to match this regular expression.")] = None,
           logprobs: Annotated[int | None, typer.Option(
               help="Return each token's log-probability with this many candidates (0-20).")] = None,
           wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
           as_json: JsonOpt = False) -> None:
    """Submit one chat request; print its id (or its result with --wait)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}]
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
              "n": n if n != 1 else None}
    with errors():
        params["response_format"] = _response_format(json_schema, json_object, regex)
        if logprobs is not None:
            params.update(logprobs=True, top_logprobs=logprobs)
        client = get_client()
        rid = client.submit(messages=messages, **params)
        if not wait:
            show({"id": rid, "status": "queued"}, as_json)
            return
        result = client.wait(rid)
    if as_json:
        show(result, True)
    elif result["status"] != "succeeded":
        typer.echo(json.dumps(result))
    else:
        texts = [c["text"] for c in result.get("choices") or [result]]
        typer.echo("\n---\n".join(texts))


def _response_format(json_schema: Path | None, json_object: bool, regex: str | None) -> dict | None:
    """``response_format`` from the submit options (at most one of them)."""
    from worker.errors import InvalidRequest

    if sum([json_schema is not None, json_object, regex is not None]) > 1:
        raise InvalidRequest("give one of --json-schema, --json-object and --regex")
    if json_schema is not None:
        try:
            schema = json.loads(json_schema.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"--json-schema: {json_schema} is not a readable JSON file "
                                 f"({exc})") from None
        name = re.sub(r"[^A-Za-z0-9_-]", "_", json_schema.stem)[:64] or "schema"
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    if json_object:
        return {"type": "json_object"}
    return {"type": "regex", "pattern": regex} if regex is not None else None

