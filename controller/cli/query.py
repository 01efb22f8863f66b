"""``editq query "prompt"``: ask the served model through the OpenAI-compatible API and show which weight version
answered. Register it on the main app with ``app.command("query")(query)``."""

from __future__ import annotations

import json
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from shared.settings import Settings

console = Console()
err_console = Console(stderr=True)


def _default_url() -> str:
    settings = Settings()
    return f"http://{settings.api_host}:{settings.api_port}"


def query(
    prompt: Annotated[str, typer.Argument(help="What to ask (a completion prompt, or a chat message with --chat).")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens to generate.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    chat: Annotated[bool, typer.Option("--chat", help="Send as a chat message (model's chat template).")] = False,
    min_version: Annotated[
        int | None, typer.Option("--min-version", help="Read-your-writes: only replicas at this version or newer.")
    ] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they arrive.")] = False,
    url: Annotated[str | None, typer.Option(help="API base URL (default: EDITQ_API_HOST/PORT).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw response.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 120.0,
) -> None:
    """Ask the served model; prints the answer and the weight version (and replica) that produced it."""
    base = (url or _default_url()).rstrip("/")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict = {"max_tokens": max_tokens, "temperature": temperature, "stream": stream}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if min_version is not None:
        body["min_version"] = min_version
    key = Settings().api_key
    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    try:
        with httpx.Client(timeout=timeout, headers=headers) as client:
            if stream:
                _stream(client, base + path, body, chat)
                return
            response = client.post(base + path, json=body)
    except httpx.HTTPError as err:
        err_console.print(f"[bold red]error:[/] cannot reach {base}: {err}")
        raise typer.Exit(code=2) from None
    data = _json_or_exit(response)
    if as_json:
        console.print_json(json.dumps(data))
        return
    choice = data["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    if chat:
        console.print(text, highlight=False, markup=False)
    else:
        console.print(f"[dim]{escape(prompt)}[/]{escape(text)}", highlight=False)
    meta = data.get("editq", {})
    console.print(f"[dim]weight version {meta.get('version')} on {', '.join(meta.get('replicas', []))}[/]")


def _json_or_exit(response: httpx.Response) -> dict:
    try:
        data = response.json()
    except ValueError:
        data = {"error": {"message": response.text}}
    if response.status_code != 200:
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data
        err_console.print(f"[bold red]error {response.status_code}:[/] {message or data.get('detail')}")
        if response.status_code == 401:
            err_console.print("set EDITQ_API_KEY to a key with the 'query' scope (editq keys create NAME)")
        raise typer.Exit(code=1)
    return data


def _stream(client: httpx.Client, url: str, body: dict, chat: bool) -> None:
    version = None
    with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            response.read()
            _json_or_exit(response)
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                err_console.print(f"\n[bold red]error:[/] {event['error']['message']}")
                raise typer.Exit(code=1)
            choice = event["choices"][0]
            piece = choice["delta"].get("content", "") if chat else choice["text"]
            console.print(piece, end="", highlight=False, markup=False)
            version = event.get("editq", {}).get("version", version)
    console.print()
    console.print(f"[dim]weight version {version}[/]")
