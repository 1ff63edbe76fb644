"""The HTML view: a real server on a free loopback port, fetched over HTTP like a browser would."""

import html
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from t2po.envs.webshop.env import open_shop
from t2po.envs.webshop.web import ShopSite, main, make_server


@pytest.fixture(scope="module")
def site():
    shop = open_shop(None, True, False, 300, 2)
    site = ShopSite(shop, shop.catalog.split_goals("test"))
    server = make_server(site, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield site, f"http://{host}:{port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _get(url: str) -> tuple[str, str]:
    """(final URL after redirects, body)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.geturl(), response.read().decode("utf-8")


def test_browse_search_results_item_and_buy(site):
    site_obj, base = site
    _, home = _get(base + "/")
    assert "Start a random task" in home
    session_url, page = _get(base + "/start?goal=0")
    session_id = session_url.rsplit("/", 1)[-1]
    goal = site_obj.sessions[session_id].goal
    assert goal is site_obj.goals[0]
    assert 'id="search_input"' in page and html.escape(goal.instruction_text) in page
    product = site_obj.shop.catalog.by_asin[goal.asin]

    url, results = _get(f"{session_url}/search?q={urllib.parse.quote(product.name)}")
    assert url == session_url
    assert "Total results:" in results and goal.asin in results

    _, item = _get(f"{session_url}/click?e={goal.asin.lower()}")
    assert "Buy Now" in item and "Price:" in item
    for value in goal.goal_options.values():
        _, item = _get(f"{session_url}/click?e={urllib.parse.quote(value)}")
        assert f'class="opt selected" href="/s/{session_id}/click?e={urllib.parse.quote(value)}"' in item

    _, features = _get(f"{session_url}/click?e=features")
    assert all(b.split(":")[0] in features for b in product.bullet_points)
    _get(f"{session_url}/click?e=%3C%20prev")
    _, done = _get(f"{session_url}/click?e=buy%20now")
    assert "Thank you for shopping with us!" in done and "Your score: 1.000" in done
    assert site_obj.sessions[session_id].outcome.reward == 1.0


def test_unknown_session_and_bad_input(site):
    _, base = site
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(base + "/s/nosuchsession")
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(base + "/start?goal=abc")
    assert err.value.code == 400
    for goal in ("9" * 5000, "%C2%B2"):  # int() refuses 5,000 digits and "²" (which isdigit)
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(base + f"/start?goal={goal}")
        assert err.value.code == 400
    session_url, _ = _get(base + "/start?goal=0")
    url, page = _get(session_url + "/search?q=t-shirt+size+s")  # used to drop the connection
    assert url == session_url and "Total results:" in page


def test_main_reports_a_bad_data_dir(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path), "--port", "0"]) == 2
    assert "items_shuffle_1000.json" in capsys.readouterr().err
