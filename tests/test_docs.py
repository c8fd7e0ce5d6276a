"""The documentation site: the builder (`.ci/build_docs.py`: nbdev's processors, execution, MkDocs Material with
mkdocs-jupyter) on small notebooks, and headless-Chromium checks of the real site (built by `.ci/docs.sh` into `_docs/`):
the model page and the site's search."""

import functools, html, http.server, importlib.util, json, os, re, shutil, subprocess, tempfile, threading
from pathlib import Path
from urllib.parse import urlparse
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = Path(os.environ.get("EFFNET_DOCS_DIR", ROOT / "_docs"))
REQUIRE = os.environ.get("EFFNET_DOCS_REQUIRE_BROWSER") == "1"  # set by .ci/docs.sh: skipping is then a failure
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _builder():
    spec = importlib.util.spec_from_file_location("build_docs", ROOT / ".ci" / "build_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _chromium():
    exe = next((shutil.which(o) for o in ("chromium", "chromium-browser", "google-chrome") if shutil.which(o)), None)
    if exe is None:
        if REQUIRE:
            pytest.fail("chromium is not installed (.ci/docs.sh installs it with apt-get)")
        pytest.skip("chromium not installed: run .ci/docs.sh (it installs Debian's chromium)")
    return exe


def _browse(page, *args, size="1400,2400"):
    "Run headless Chromium on `page` with a fresh profile; return stdout"
    with tempfile.TemporaryDirectory() as prof:
        r = subprocess.run(
            [
                _chromium(),
                *CHROME_FLAGS,
                f"--user-data-dir={prof}",
                f"--window-size={size}",
                *args,
                Path(page).resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _browse_eval(url, expr, timeout=60):
    "Load `url` in headless Chromium, wait for its load event, return the awaited value of the JavaScript `expr`"
    exe = _chromium()
    cmd_r, cmd_w = os.pipe()
    out_r, out_w = os.pipe()  # the DevTools protocol over a pipe: no extra package

    def fds():  # the browser reads commands on fd 3 and writes replies on fd 4
        a, b = os.dup(cmd_r), os.dup(out_w)
        os.dup2(a, 3)
        os.dup2(b, 4)

    prof = tempfile.mkdtemp()
    p = subprocess.Popen(
        [exe, *CHROME_FLAGS, f"--user-data-dir={prof}", "--remote-debugging-pipe", "about:blank"],
        preexec_fn=fds,
        close_fds=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(cmd_r)
    os.close(out_w)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    w, buf, n = os.fdopen(cmd_w, "wb"), b"", 0

    def recv(pred):
        nonlocal buf
        while True:
            while b"\0" in buf:
                m, buf = buf.split(b"\0", 1)
                m = json.loads(m)
                if pred(m):
                    return m
            d = os.read(out_r, 1 << 16)
            if not d:
                raise RuntimeError("chromium exited (or timed out)")
            buf += d

    def call(method, session=None, **params):
        nonlocal n
        n += 1
        i = n
        w.write(
            json.dumps(dict(id=i, method=method, params=params, **({"sessionId": session} if session else {}))).encode()
            + b"\0"
        )
        w.flush()
        m = recv(lambda m: m.get("id") == i)
        if "error" in m:
            raise RuntimeError(m["error"])
        return m["result"]

    try:
        tid = call("Target.createTarget", url="about:blank")["targetId"]
        sid = call("Target.attachToTarget", targetId=tid, flatten=True)["sessionId"]
        call("Page.enable", sid)
        call("Page.navigate", sid, url=url)
        recv(lambda m: m.get("method") == "Page.loadEventFired")
        r = call("Runtime.evaluate", sid, expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise AssertionError(r["exceptionDetails"].get("exception", {}).get("description"))
        return r["result"].get("value")
    finally:
        try:
            call("Browser.close")
        except Exception:
            pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        timer.cancel()
        w.close()
        os.close(out_r)
        shutil.rmtree(prof, ignore_errors=True)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _served(site):
    "Serve `site` over HTTP on a free local port (the search index is fetched by a web worker: not from file://)"
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


# Material opens its search with the `q` query parameter; wait for the results and return their links
SEARCH_RESULTS = """new Promise((resolve, reject) => { const t0 = Date.now(); const poll = () => {
  const links = [...document.querySelectorAll('.md-search-result__item a')].map(a => a.getAttribute('href'));
  if (links.length) resolve(links);
  else if (Date.now() - t0 > 30000) reject(new Error('no search result: ' +
    (document.querySelector('.md-search-result__meta') || {}).textContent));
  else setTimeout(poll, 100); }; poll(); })"""


def _search(site, query):
    "The result links of the site's own search box for `query`, as paths relative to `site`"
    srv = _served(site)
    try:
        links = _browse_eval(f"http://127.0.0.1:{srv.server_port}/index.html?q={query}", SEARCH_RESULTS)
    finally:
        srv.shutdown()
        srv.server_close()
    return [urlparse(l).path.lstrip("/") + (f"#{urlparse(l).fragment}" if urlparse(l).fragment else "") for l in links]


def _text(h):
    return html.unescape(re.sub(r"<[^>]+>", "", h))


def _cell(src, kind="code", outputs=None):
    c = dict(cell_type=kind, metadata={}, source=src)
    if kind == "code":
        c.update(execution_count=None, outputs=outputs or [])
    return c


def _nb(path, cells):
    path.write_text(
        json.dumps(
            dict(
                cells=cells,
                nbformat=4,
                nbformat_minor=5,
                metadata=dict(kernelspec=dict(display_name="python3", language="python", name="python3")),
            )
        )
    )


COMMITTED = dict(output_type="stream", name="stdout", text=["committed output of a slow cell\n"])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "A two-page site built from small notebooks that exercise every feature the builder supports"
    tmp = tmp_path_factory.mktemp("site")
    nbs = tmp / "nbs"
    nbs.mkdir()
    _nb(
        nbs / "index.ipynb",
        [
            _cell("# Demo site\n\n> The index page", "markdown"),
            _cell("See [the demo page](01_demo.ipynb) and `greet`.", "markdown"),
        ],
    )
    _nb(
        nbs / "01_demo.ipynb",
        [
            _cell("#| default_exp demo"),
            _cell("# Demo\n\n> A page with every kind of cell", "markdown"),
            _cell('#| hide\nSECRET = "hidden-cell-source"'),
            _cell(
                '#| export\ndef greet(name:str="world", # who to greet\n          times:int=1):\n    "Say hello to `name`"\n    return f"hello {name}" * times'
            ),
            _cell("## Usage\n\n| a | b |\n|---|---|\n| 1 | 2 |", "markdown"),
            _cell('#| eval: true\ngreet("docs")'),
            _cell('print("from stdout", SECRET[:6])'),
            _cell('#| echo: false\nprint("only the output")'),
            _cell('#| slow\nraise RuntimeError("a slow cell must not run in the default build")', outputs=[COMMITTED]),
            _cell("import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0]);"),
            _cell("### Usage\n\nA second heading with the same text", "markdown"),
        ],
    )
    out = tmp / "_docs"
    _builder().build(nbs, out, jobs=2)
    return out


def test_page_names():
    b = _builder()
    assert b.page_name(Path("nbs/02_model.ipynb"), Path("nbs")) == "model.html"
    assert b.page_name(Path("nbs/index.ipynb"), Path("nbs")) == "index.html"
    assert b.page_name(Path("nbs/tut/10a_video.ipynb"), Path("nbs")) == "tut/video.html"


def test_anchors():
    "Headings get Quarto's identifiers, the ones nbdev writes into `_modidx.py`"
    b = _builder()
    assert b._anchor("MBConvBlock.__init__") == "mbconvblock.__init__"
    assert b._anchor("efficientnet_b3") == "efficientnet_b3"
    assert b._anchor("Gradient checkpointing") == "gradient-checkpointing"
    assert b._anchor("<code>Learner</code> &amp; friends") == "learner-friends"


def test_site_pages_and_navigation(site):
    assert sorted(p.name for p in site.glob("*.html")) == ["404.html", "demo.html", "index.html"]
    for page in ("index.html", "demo.html"):  # every page's navigation lists every page, the index first
        nav = re.search(r'<nav class="md-nav md-nav--primary".*?</nav>', (site / page).read_text(), re.S).group(0)
        links = re.findall(r'class="md-nav__link[^"]*"[^>]*href="([^"]+)"|href="([^"]+)"[^>]*class="md-nav__link', nav)
        assert [a or b for a, b in links if (a or b).endswith(".html")][:2] == ["index.html", "demo.html"]
    idx = (site / "index.html").read_text()
    assert re.search(r'<h1 id="demo-site">Demo site', idx) and "The index page" in idx
    assert '<a href="demo.html">the demo page</a>' in idx  # the notebook link points at the rendered page
    assert (site / "assets" / "javascripts").is_dir() and "assets/stylesheets/main." in idx  # Material's theme


def test_site_cells(site):
    h = (site / "demo.html").read_text()
    t = _text(h)
    assert "hidden-cell-source" not in t and "SECRET =" not in t  # `#| hide` cell omitted
    assert "#|" not in t and "default_exp" not in t  # directives stripped
    assert "return f" not in t  # `#| export` source hidden, as in nbdev
    assert 'id="greet"' in h and "def greet(\n    name:str='world', # who to greet" in t and "Say hello to name" in t
    assert '<span class="k">def</span>' in h  # the signature is highlighted
    assert 'greet("docs")' in t and "'hello docs'" in t  # executed result
    assert "from stdout hidden" in t  # stdout of a cell run by the build
    assert "only the output" in t and 'print("only' not in t  # echo: false
    assert "committed output of a slow cell" in t and "a slow cell: not re-run" in t  # slow: kept output, marked
    assert re.search(r'<img[^>]+src="data:image/png;base64,[A-Za-z0-9+/]{100,}', h)  # the plot
    assert re.search(r"<table>.*<td>2</td>", h, re.S)
    toc = re.search(r'<nav class="md-nav md-nav--secondary".*?</nav>', h, re.S).group(0)  # the page's contents
    assert 'href="#greet"' in toc and 'href="#usage"' in toc and 'href="#usage-1"' in toc
    assert 'id="usage"' in h and 'id="usage-1"' in h  # repeated headings get distinct anchors
    docs = json.loads((site / "search" / "search_index.json").read_text())["docs"]
    assert any(d["location"] == "demo.html#greet" and "Say hello" in d["text"] for d in docs)
    page = " ".join(d["text"] for d in docs if d["location"].startswith("demo.html"))
    assert page.count('print("from stdout"') == 1 and "Copied!" not in page  # each cell's source indexed once


def test_browser_demo_site(site):
    dom = _browse(site / "demo.html", "--dump-dom")
    assert "Say hello to" in dom and 'id="greet"' in dom and "data:image/png;base64" in dom


def test_browser_demo_search(site):
    assert "demo.html#greet" in _search(site, "greet")


def _real_site(page):
    page = DOCS / page
    if not page.exists():
        if REQUIRE:
            pytest.fail(f"{page} was not built")
        pytest.skip(f"{page} not built: run `python .ci/build_docs.py` (or .ci/docs.sh)")
    return page


def test_browser_model_page():
    "The real site: the model page shows the variant table, the factories page `efficientnet_b3`'s signature"
    page = _real_site("model.html")
    dom = _browse(page, "--dump-dom")
    assert re.search(r'<h1 id="model"[^>]*>Model', dom)
    table = re.search(r'<table[^>]*class="dataframe".*?</table>', dom, re.S)
    assert table, "variant table missing"
    rows = re.findall(r"<tr>\s*<th>(\w+)</th>", table.group(0))
    assert rows == ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "l2"]
    for col in ("width", "depth", "resolution", "dropout"):
        assert f"<th>{col}</th>" in table.group(0)
    fdom = _browse(_real_site("factories.html"), "--dump-dom")  # the factories live in `effnet_fastai.factories` (0.2)
    assert 'id="efficientnet_b3"' in fdom
    sig = re.search(r'id="efficientnet_b3".*?<pre>(.*?)</pre>', fdom, re.S)
    text = html.unescape(re.sub(r"<[^>]+>", "", sig.group(1)))
    assert (
        text.startswith("def efficientnet_b3(")
        and "pretrained:bool | str | Path=False" in text
        and "ndim:int=3" in text
    )
    shot = DOCS / "_screenshots" / "model.png"
    shot.parent.mkdir(exist_ok=True)
    _browse(page, f"--screenshot={shot}", size="1400,5200")  # tall enough for the variant table
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_browser_search_dropconnect():
    "The real site: the search box finds `DropConnect` on its page, the layers page"
    _real_site("layers.html")
    docs = json.loads((DOCS / "search" / "search_index.json").read_text())["docs"]
    assert any(d["location"] == "layers.html#dropconnect" and d["title"] == "DropConnect" for d in docs)
    results = _search(DOCS, "DropConnect")
    assert "layers.html#dropconnect" in results, results
