"""The WebShop shop as HTML pages a person can browse (WebShop had a Flask site for its human
demonstrations): `t2po webshop-server [--port N] [--host 127.0.0.1]`.

Every page is rendered from the same `engine.Page` the agent sees, and every link or form sends the
same `search[...]` / `click[...]` action to `Shop.act`, so a person plays exactly the agent's game:

    GET /                      choose a task (a goal of the split), or a random one
    GET /start?goal=N          start a session on goal N, redirect to its page
    GET /s/<id>                the session's current page
    GET /s/<id>/search?q=...   search[...]; then back to /s/<id>
    GET /s/<id>/click?e=...    click[...]; then back to /s/<id>

The server binds 127.0.0.1 by default and keeps sessions in memory.
"""

from __future__ import annotations

import argparse
import html
import random
import re
import secrets
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

from t2po.bounds import PORT, bounded
from t2po.envs.webshop.catalog import SPLITS, Goal
from t2po.envs.webshop.engine import Page, Shop, ShopSession

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #222; }
header { background: #232f3e; color: #fff; padding: 10px 24px; }
header a { color: #febd69; text-decoration: none; font-weight: bold; font-size: 1.4em; }
main { max-width: 980px; margin: 16px auto; padding: 0 16px; }
.instruction { background: #fff8e1; border: 1px solid #f0c36d; padding: 10px 14px; margin-bottom: 14px; }
.btn { display: inline-block; padding: 6px 14px; margin: 3px 4px 3px 0; background: #0d6efd; color: #fff;
       border-radius: 4px; text-decoration: none; }
.btn.buy { background: #f0a30a; color: #111; font-weight: bold; }
.product { background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 8px 12px; margin: 8px 0; }
.product.visited a.asin { color: #6f42c1; }
.opt { display: inline-block; padding: 4px 10px; margin: 2px; border: 1px solid #888; border-radius: 14px;
       text-decoration: none; color: #222; background: #fff; }
.opt.selected { background: #198754; color: #fff; border-color: #198754; }
.group { font-weight: bold; margin: 10px 0 2px; text-transform: capitalize; }
.done { font-size: 1.3em; }
form input[type=text] { width: 60%; padding: 6px; }
"""


class ShopSite:
    """The sessions of the site and the HTML for each page."""

    def __init__(self, shop: Shop, goals: list[Goal], seed: int = 0) -> None:
        self.shop = shop
        self.goals = goals
        self.sessions: dict[str, ShopSession] = {}
        self._steps: dict[str, int] = {}
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def start(self, goal_index: int | None) -> str:
        with self._lock:
            index = self._rng.randrange(len(self.goals)) if goal_index is None else goal_index % len(self.goals)
            session_id = secrets.token_hex(6)
            self.sessions[session_id] = self.shop.new_session(self.goals[index])
            self._steps[session_id] = 0
        return session_id

    def act(self, session_id: str, action: str) -> None:
        with self._lock:
            if self.shop.act(self.sessions[session_id], action):
                self._steps[session_id] += 1

    def home_html(self) -> str:
        body = (
            f"<h2>WebShop</h2><p>{len(self.goals)} tasks in this split, {len(self.shop.catalog.products)} products "
            f"({html.escape(self.shop.catalog.source)}).</p>"
            '<p><a class="btn" href="/start">Start a random task</a></p>'
            '<form action="/start" method="get">Task number: <input type="number" name="goal" min="0" value="0"> '
            '<button type="submit">Start</button></form>'
        )
        return _document("WebShop", body)

    def page_html(self, session_id: str) -> str:
        with self._lock:
            session = self.sessions[session_id]
            page = self.shop.render(session)
            steps = self._steps[session_id]
        base = f"/s/{session_id}"
        parts = [f'<div class="instruction"><b>Instruction:</b> {html.escape(session.goal.instruction_text)}'
                 f'<br><small>{steps} action(s) so far</small></div>']
        if page.has_search_bar:
            parts.append(
                f'<form action="{base}/search" method="get"><input id="search_input" type="text" name="q" '
                'placeholder="Search..." required autofocus> <button class="btn" type="submit">Search</button></form>'
            )
        parts.append(_elements_html(page, base))
        if page.kind == "done" and session.outcome is not None:
            details = ", ".join(f"{k}={v}" for k, v in session.outcome.as_dict().items())
            parts.append('<p class="done">Your score: '
                         f'{session.outcome.reward:.3f}</p><p><small>{html.escape(details)}</small></p>'
                         '<p><a class="btn" href="/">New task</a></p>')
        return _document(f"WebShop: {page.kind}", "\n".join(parts))


def _elements_html(page: Page, base: str) -> str:
    """The page's elements after the instruction: buttons and options as links that send a click,
    each product as a card (ASIN link, then its title and price)."""
    out: list[str] = []
    in_card = False
    elements = [e for e in page.elements if e.kind != "instruction" and e.text != "Instruction:"]
    for i, e in enumerate(elements):
        click = f'{base}/click?e={quote(e.text.lower() if e.kind in ("button", "product") else e.text)}'
        if e.kind == "product":
            if in_card:
                out.append("</div>")
            out.append(f'<div class="product{" visited" if e.selected else ""}"><a class="asin" '
                       f'href="{click}">{html.escape(e.text)}</a>')
            in_card = True
            continue
        if e.kind != "text" and in_card:
            out.append("</div>")
            in_card = False
        if e.kind == "button":
            if e.text == "Search":
                continue  # the search form has its own button
            css = "btn buy" if e.text == "Buy Now" else "btn"
            out.append(f'<a class="{css}" href="{click}">{html.escape(e.text)}</a>')
        elif e.kind == "option":
            out.append(f'<a class="opt{" selected" if e.selected else ""}" href="{click}">{html.escape(e.text)}</a>')
        elif page.kind == "item" and i + 1 < len(elements) and elements[i + 1].kind == "option":
            out.append(f'<div class="group">{html.escape(e.text)}</div>')
        else:
            out.append(f"<p>{html.escape(e.text)}</p>")
    if in_card:
        out.append("</div>")
    return "\n".join(out)


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html><head><meta "
        f"charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body><header><a "
        f"href='/'>WebShop</a></header><main>{body}</main></body></html>"
    )


_GOAL_NUMBER = re.compile(r"-?[0-9]{1,9}")


def _handler(site: ShopSite) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            # a request the pages did not foresee gets an error page, never a dropped connection
            try:
                self._get()
            except Exception as err:  # noqa: BLE001 (reported to the client, the server keeps serving)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR,
                           _document("Error", f"<p>{html.escape(type(err).__name__)}: {html.escape(str(err))}</p>"))

        def _get(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            parts = [p for p in url.path.split("/") if p]
            if not parts:
                return self._send(HTTPStatus.OK, site.home_html())
            if parts == ["start"]:
                goal = query.get("goal", "")
                # ASCII digits only, and few of them: int() also takes "²"-like digits (then fails)
                # and refuses numbers past 4,300 digits
                if goal and not _GOAL_NUMBER.fullmatch(goal):
                    return self._send(HTTPStatus.BAD_REQUEST,
                                      _document("Bad request", "<p>goal must be a task number.</p>"))
                return self._redirect(f"/s/{site.start(int(goal) if goal else None)}")
            if len(parts) >= 2 and parts[0] == "s":
                session_id = parts[1]
                if session_id not in site.sessions:
                    body = "<p>No such session (the server keeps sessions in memory). <a href='/'>Start a task</a>.</p>"
                    return self._send(HTTPStatus.NOT_FOUND, _document("Unknown session", body))
                if len(parts) == 2:
                    return self._send(HTTPStatus.OK, site.page_html(session_id))
                if parts[2:] == ["search"]:
                    site.act(session_id, f"search[{query.get('q', '')}]")
                    return self._redirect(f"/s/{session_id}")
                if parts[2:] == ["click"]:
                    site.act(session_id, f"click[{query.get('e', '')}]")
                    return self._redirect(f"/s/{session_id}")
            self._send(HTTPStatus.NOT_FOUND, _document("Not found", "<p>Not found. <a href='/'>Home</a></p>"))

        def _send(self, status: HTTPStatus, body: str) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _redirect(self, location: str) -> None:
            self.send_response(HTTPStatus.SEE_OTHER)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # keep test and terminal output quiet
            pass

    return Handler


def make_server(site: ShopSite, host: str = "127.0.0.1", port: int = 3000) -> ThreadingHTTPServer:
    """An HTTP server for `site` (port 0: any free port; see `server.server_address`)."""
    return ThreadingHTTPServer((host, port), _handler(site))


def main(argv: list[str] | None = None) -> int:
    """`t2po webshop-server`: serve the shop on http://HOST:PORT until interrupted."""
    parser = argparse.ArgumentParser(prog="t2po webshop-server",
                                     description="Browse the WebShop environment as HTML pages.")
    parser.add_argument("--port", type=PORT, default=3000, help="port to listen on (default 3000, as WebShop)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="which goals to offer (default test)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with WebShop's data files (default: generated catalog)")
    parser.add_argument("--full", action="store_true",
                        help="with --data-dir: the full data files, not the 1,000-product ones")
    parser.add_argument("--human-goals", action="store_true", help="with --data-dir: human-written instructions")
    parser.add_argument("--num-products", type=bounded(1, 1_000_000), default=None,
                        help="generated catalog size (default 1000)")
    parser.add_argument("--catalog-seed", type=int, default=0, help="seed of the generated catalog (default 0)")
    args = parser.parse_args(argv)

    from t2po.envs.webshop.env import open_shop  # the env module registers the environment too

    try:
        shop = open_shop(args.data_dir, not args.full, args.human_goals, args.num_products, args.catalog_seed)
        goals = shop.catalog.split_goals(args.split)
        server = make_server(ShopSite(shop, goals), args.host, args.port)
    except (OSError, ValueError) as err:
        print(f"webshop-server: {err}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"WebShop: {len(goals)} {args.split} tasks over {len(shop.catalog.products)} products at "
          f"http://{host}:{port}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
