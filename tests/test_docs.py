"""The documentation site: the builder (`.ci/build_docs.py`: nbdev's processors, execution, MkDocs Material with
mkdocs-jupyter) on small notebooks, and a headless-Chromium check of the real site's model page (built by
`.ci/docs.sh` into `_docs/`)."""
import html, importlib.util, json, os, re, shutil, subprocess, tempfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = Path(os.environ.get('EFFNET_DOCS_DIR', ROOT / '_docs'))
REQUIRE = os.environ.get('EFFNET_DOCS_REQUIRE_BROWSER') == '1'  # set by .ci/docs.sh: skipping is then a failure
CHROME_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync']

def _builder():
    spec = importlib.util.spec_from_file_location('build_docs', ROOT / '.ci' / 'build_docs.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def _chromium():
    exe = next((shutil.which(o) for o in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(o)), None)
    if exe is None:
        if REQUIRE: pytest.fail('chromium is not installed (.ci/docs.sh installs it with apt-get)')
        pytest.skip('chromium not installed: run .ci/docs.sh (it installs Debian\'s chromium)')
    return exe

def _browse(page, *args, size='1400,2400'):
    "Run headless Chromium on `page` with a fresh profile; return stdout"
    with tempfile.TemporaryDirectory() as prof:
        r = subprocess.run([_chromium(), *CHROME_FLAGS, f'--user-data-dir={prof}', f'--window-size={size}', *args,
                            Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout

def _text(h): return html.unescape(re.sub(r'<[^>]+>', '', h))

def _cell(src, kind='code', outputs=None):
    c = dict(cell_type=kind, metadata={}, source=src)
    if kind == 'code': c.update(execution_count=None, outputs=outputs or [])
    return c

def _nb(path, cells):
    path.write_text(json.dumps(dict(cells=cells, nbformat=4, nbformat_minor=5,
        metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')))))

COMMITTED = dict(output_type='stream', name='stdout', text=['committed output of a slow cell\n'])

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "A two-page site built from small notebooks that exercise every feature the builder supports"
    tmp = tmp_path_factory.mktemp('site'); nbs = tmp / 'nbs'; nbs.mkdir()
    _nb(nbs / 'index.ipynb', [_cell('# Demo site\n\n> The index page', 'markdown'),
                              _cell('See [the demo page](01_demo.ipynb) and `greet`.', 'markdown')])
    _nb(nbs / '01_demo.ipynb', [
        _cell('#| default_exp demo'), _cell('# Demo\n\n> A page with every kind of cell', 'markdown'),
        _cell('#| hide\nSECRET = "hidden-cell-source"'),
        _cell('#| export\ndef greet(name:str="world", # who to greet\n          times:int=1):\n    "Say hello to `name`"\n    return f"hello {name}" * times'),
        _cell('## Usage\n\n| a | b |\n|---|---|\n| 1 | 2 |', 'markdown'),
        _cell('#| eval: true\ngreet("docs")'),
        _cell('print("from stdout", SECRET[:6])'),
        _cell('#| echo: false\nprint("only the output")'),
        _cell('#| slow\nraise RuntimeError("a slow cell must not run in the default build")', outputs=[COMMITTED]),
        _cell('import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0]);'),
        _cell('### Usage\n\nA second heading with the same text', 'markdown'),
    ])
    out = tmp / '_docs'
    _builder().build(nbs, out, jobs=2)
    return out

def test_page_names():
    b = _builder()
    assert b.page_name(Path('nbs/02_model.ipynb'), Path('nbs')) == 'model.html'
    assert b.page_name(Path('nbs/index.ipynb'), Path('nbs')) == 'index.html'
    assert b.page_name(Path('nbs/tut/10a_video.ipynb'), Path('nbs')) == 'tut/video.html'

def test_anchors():
    "Headings get Quarto's identifiers, the ones nbdev writes into `_modidx.py`"
    b = _builder()
    assert b._anchor('MBConvBlock.__init__') == 'mbconvblock.__init__'
    assert b._anchor('efficientnet_b3') == 'efficientnet_b3'
    assert b._anchor('Gradient checkpointing') == 'gradient-checkpointing'
    assert b._anchor('<code>Learner</code> &amp; friends') == 'learner-friends'

def test_site_pages_and_navigation(site):
    assert sorted(p.name for p in site.glob('*.html')) == ['404.html', 'demo.html', 'index.html']
    for page in ('index.html', 'demo.html'):  # every page's navigation lists every page, the index first
        nav = re.search(r'<nav class="md-nav md-nav--primary".*?</nav>', (site / page).read_text(), re.S).group(0)
        links = re.findall(r'class="md-nav__link[^"]*"[^>]*href="([^"]+)"|href="([^"]+)"[^>]*class="md-nav__link', nav)
        assert [a or b for a, b in links if (a or b).endswith('.html')][:2] == ['index.html', 'demo.html']
    idx = (site / 'index.html').read_text()
    assert re.search(r'<h1 id="demo-site">Demo site', idx) and 'The index page' in idx
    assert '<a href="demo.html">the demo page</a>' in idx  # the notebook link points at the rendered page
    assert (site / 'assets' / 'javascripts').is_dir() and 'assets/stylesheets/main.' in idx  # Material's theme

def test_site_cells(site):
    h = (site / 'demo.html').read_text(); t = _text(h)
    assert 'hidden-cell-source' not in t and 'SECRET =' not in t      # `#| hide` cell omitted
    assert '#|' not in t and 'default_exp' not in t                   # directives stripped
    assert 'return f' not in t                                         # `#| export` source hidden, as in nbdev
    assert 'id="greet"' in h and "def greet(\n    name:str='world', # who to greet" in t and 'Say hello to name' in t
    assert '<span class="k">def</span>' in h                           # the signature is highlighted
    assert 'greet("docs")' in t and "'hello docs'" in t                # executed result
    assert 'from stdout hidden' in t                                   # stdout of a cell run by the build
    assert 'only the output' in t and 'print("only' not in t           # echo: false
    assert 'committed output of a slow cell' in t and 'a slow cell: not re-run' in t  # slow: kept output, marked
    assert re.search(r'<img[^>]+src="data:image/png;base64,[A-Za-z0-9+/]{100,}', h)  # the plot
    assert re.search(r'<table>.*<td>2</td>', h, re.S)
    toc = re.search(r'<nav class="md-nav md-nav--secondary".*?</nav>', h, re.S).group(0)  # the page's contents
    assert 'href="#greet"' in toc and 'href="#usage"' in toc and 'href="#usage-1"' in toc
    assert 'id="usage"' in h and 'id="usage-1"' in h                   # repeated headings get distinct anchors
    docs = json.loads((site / 'search' / 'search_index.json').read_text())['docs']
    assert any(d['location'] == 'demo.html#greet' and 'Say hello' in d['text'] for d in docs)
    page = ' '.join(d['text'] for d in docs if d['location'].startswith('demo.html'))
    assert page.count('print("from stdout"') == 1 and 'Copied!' not in page  # each cell's source indexed once

def test_browser_demo_site(site):
    dom = _browse(site / 'demo.html', '--dump-dom')
    assert 'Say hello to' in dom and 'id="greet"' in dom and 'data:image/png;base64' in dom

def _real_site(page):
    page = DOCS / page
    if not page.exists():
        if REQUIRE: pytest.fail(f'{page} was not built')
        pytest.skip(f'{page} not built: run `python .ci/build_docs.py` (or .ci/docs.sh)')
    return page

def test_browser_model_page():
    "The real site: the model page shows the variant table and `efficientnet_b3`'s signature"
    page = _real_site('model.html')
    dom = _browse(page, '--dump-dom')
    assert re.search(r'<h1 id="model"[^>]*>Model', dom)
    table = re.search(r'<table[^>]*class="dataframe".*?</table>', dom, re.S)
    assert table, 'variant table missing'
    rows = re.findall(r'<tr>\s*<th>(\w+)</th>', table.group(0))
    assert rows == ['b0', 'b1', 'b2', 'b3', 'b4', 'b5', 'b6', 'b7', 'b8', 'l2']
    for col in ('width', 'depth', 'resolution', 'dropout'): assert f'<th>{col}</th>' in table.group(0)
    assert 'id="efficientnet_b3"' in dom
    sig = re.search(r'id="efficientnet_b3".*?<pre>(.*?)</pre>', dom, re.S)
    text = html.unescape(re.sub(r'<[^>]+>', '', sig.group(1)))
    assert text.startswith('def efficientnet_b3(') and 'pretrained:bool=False' in text and 'ndim:int=3' in text
    shot = DOCS / '_screenshots' / 'model.png'
    shot.parent.mkdir(exist_ok=True)
    _browse(page, f'--screenshot={shot}', size='1400,5200')  # tall enough for the variant table and efficientnet_b3
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
