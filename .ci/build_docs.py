#!/usr/bin/env python
"""Build the documentation site `_docs/` from every notebook in `nbs/`, without Quarto.

    python .ci/build_docs.py [--slow] [--jobs N] [--nbs nbs] [--out _docs]

Each notebook is processed the way `nbdev_docs` processes it (nbdev's own cell processors: `show_doc` cells added
after exported definitions, `#| hide`/`#| export` cells removed, directive comments stripped, `show_doc` cells shown
without their code), then EXECUTED from top to bottom with execnb so every output on the site is the one the
current code produces. Cells flagged with one of the `tst_flags` of settings.ini (`#| slow`, `#| cuda`) are not
run unless `--slow` is given: they keep the output committed in the notebook, marked as such. A cell that raises
fails the build. Markdown is rendered with markdown-it-py, code with pygments; each page gets a sidebar with every
page and the current page's sections. Needs only nbdev, execnb, markdown-it-py and pygments.
"""
from __future__ import annotations
import argparse, html, json, os, re, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from execnb.nbio import read_nb
from execnb.shell import CaptureShell
from nbdev.process import NBProcessor, _mk_procs
from nbdev import processors as P

_re_ansi = re.compile(r'\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])')
_re_dir = re.compile(r'^\s*#\|\s*(.*)$')

def page_name(nb_path, nbs):
    "nbdev's page name: `02_model.ipynb` -> `model.html` (so `_modidx` doc links resolve)"
    rel = Path(nb_path).relative_to(nbs)
    return str(rel.with_name(re.sub(r'^\d+[a-zA-Z0-9]*_', '', rel.stem) + '.html'))

def list_nbs(nbs):
    "Every notebook under `nbs`, skipping names starting with `_` or `.` (as nbdev does), index first"
    fs = [p for p in sorted(Path(nbs).rglob('*.ipynb'))
          if not any(part.startswith(('_', '.')) for part in p.relative_to(nbs).parts)]
    return sorted(fs, key=lambda p: (p.stem != 'index', str(p)))

# ---------------------------------------------------------------- notebook processing and execution
def _flags():
    from nbdev.config import get_config
    return set(get_config().get('tst_flags', '').split('|')) - {''}

class _add_show_docs(P.add_show_docs):
    "nbdev's `add_show_docs`, keeping the definitions' order when one cell exports several"
    def begin(self):
        exports = [c for c in self.nb.cells if P._want_doc(c)]
        trees = [t for c in self.nb.cells for t in (c.parsed_() or [])]
        shown = {P._get_nm(t) for t in P._show_docs(trees)}
        for cell in reversed(exports):
            for nm in reversed(P._def_names(cell, shown)):
                new = P.mk_cell(f'show_doc({nm})'); new.has_sd = True
                self.nb.cells.insert(cell.idx_ + 1, new)

def process_nb(path, run_slow=False):
    "Read `path`, apply nbdev's doc processors around a full execution; return (title, summary, cells)"
    path = Path(path).absolute()
    nb = read_nb(path)
    proc = NBProcessor(nb=nb, procs=[P.populate_language, _add_show_docs])  # strips directive comments
    proc.process()
    flags = set() if run_slow else _flags()
    cwd = os.getcwd(); os.chdir(path.parent)
    try:
        sh = CaptureShell(path=path.parent)
        sh.run_cell('import warnings; warnings.filterwarnings("ignore", category=FutureWarning, module="torch")\n'
                    'from nbdev.showdoc import show_doc')  # as nbdev's exec_show_docs does
        for cell in nb.cells:
            if cell.cell_type != 'code' or not cell.source.strip(): continue
            d = getattr(cell, 'directives_', None) or {}
            if d.keys() & flags or d.get('eval:', [''])[0].lower() == 'false':
                cell.not_run_ = True; continue
            cell.outputs = []
            sh.cell(cell)
            if sh.exc: raise RuntimeError(f"{path.name}: cell {cell.idx_} raised {sh.exc!r}:\n{cell.source}") from sh.exc
    finally: os.chdir(cwd)
    proc.procs = _mk_procs([P.hide_line, P.filter_stream_, P.rm_header_dash, P.clean_show_doc, P.rm_export,
                            P.clean_magics, P.hide_, P.mv_exports], nb=nb)
    proc.process()
    cells = [dict(cell_type=c.cell_type, source=c.source, outputs=[dict(o) for o in c.get('outputs', [])],
                  not_run=getattr(c, 'not_run_', False)) for c in nb.cells]
    title, summary = path.stem, ''
    for i, c in enumerate(cells):  # nbdev's title cell: `# Title` then `> summary`
        if c['cell_type'] != 'markdown': continue
        m = re.match(r'^\s*#\s+(.+?)\s*$(.*)', c['source'], re.M | re.S)
        if m:
            title, rest = m.group(1), m.group(2).strip()
            sm = re.match(r'^>\s*(.*?)(\n\n|$)(.*)', rest, re.S)
            if sm: summary, rest = sm.group(1).strip(), sm.group(3).strip()
            c['source'] = rest
        break
    return title, summary, _jsonable(cells)

def _jsonable(o):
    if isinstance(o, dict): return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)): return [_jsonable(v) for v in o]
    return o

def _process_one(path, run_slow, tmp):
    "Process `path` in a fresh interpreter (each notebook runs in a clean state, as in Jupyter)"
    t, dst = time.time(), Path(tmp) / (Path(path).stem + '.json')
    cmd = [sys.executable, __file__, '--one', str(path), '--json', str(dst)] + (['--slow'] if run_slow else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode: raise RuntimeError(f'docs build failed on {path}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}')
    return json.loads(dst.read_text()), time.time() - t

# ---------------------------------------------------------------- rendering
def _md():
    from markdown_it import MarkdownIt
    return MarkdownIt('commonmark', {'html': True, 'highlight': _highlight}).enable(['table', 'strikethrough'])

def _highlight(code, lang, attrs=''):
    from pygments import highlight
    from pygments.lexers import get_lexer_by_name, PythonLexer
    from pygments.formatters import HtmlFormatter
    from pygments.util import ClassNotFound
    try: lexer = get_lexer_by_name(lang or 'python')
    except ClassNotFound: lexer = PythonLexer()
    return highlight(code, lexer, HtmlFormatter(nowrap=True))

def _slug(text):
    s = re.sub(r'<[^>]+>', '', html.unescape(text)).strip().lower()
    return re.sub(r'[^\w.\-]+', '-', s).strip('-') or 'section'

class Page:
    def __init__(self, name, title, summary, cells, links):
        self.name, self.title, self.summary, self.cells, self.links = name, title, summary, cells, links
        self.ids, self.toc = set(), []

    def md(self, src):
        src = re.sub(r'\[([^\]]*)\]\(([^)\s]*)\)\{([^}]*)\}',  # pandoc link attributes (show_doc's source link)
                     lambda m: f'<a href="{m.group(2)}" {m.group(3)}>{m.group(1)}</a>', src)
        src = re.sub(r'^:::+\s*\{\.?([\w\-. ]+)[^}]*\}\s*$', lambda m: f'\n<div class="{m.group(1).replace(".", " ")}">\n',
                     src, flags=re.M)  # quarto fenced divs (callouts)
        src = re.sub(r'\(([^)\s]*)#LNone\)', r'(\1)', src)  # show_doc's source link when the line is unknown
        src = re.sub(r'^:::+\s*$', '\n</div>\n', src, flags=re.M)
        return self.post(_md().render(src))

    def post(self, h):
        def head(m):
            lvl, attrs, inner = m.group(1), m.group(2), m.group(3)
            i = base = _slug(inner); k = 1
            while i in self.ids: i = f'{base}-{k}'; k += 1
            self.ids.add(i)
            if lvl in '23': self.toc.append((int(lvl), i, re.sub(r'<[^>]+>', '', inner)))
            return f'<h{lvl}{attrs} id="{i}"><a class="anchor" href="#{i}">{inner}</a></h{lvl}>'
        h = re.sub(r'<h([1-6])([^>]*)>(.*?)</h\1>', head, h, flags=re.S)
        h = re.sub(r'href="([^"#:]+)\.ipynb(#[^"]*)?"', lambda m: f'href="{_rel_page(m.group(1))}.html{m.group(2) or ""}"', h)
        def link(m):  # `Name` -> link to its show_doc anchor, as nbdev does
            tgt = self.links.get(m.group(1))
            return f'<a href="{tgt}"><code>{m.group(1)}</code></a>' if tgt else m.group(0)
        parts = re.split(r'(<a\b[^>]*>.*?</a>|<pre\b.*?</pre>|<h[1-6]\b.*?</h[1-6]>)', h, flags=re.S)
        return ''.join(p if i % 2 else re.sub(r'<code>([A-Za-z_][\w.]*)</code>', link, p) for i, p in enumerate(parts))

    def output(self, o):
        t = o.get('output_type')
        if t == 'stream':
            txt = _re_ansi.sub('', ''.join(o.get('text', '')))
            return f'<pre class="out stream {o.get("name", "")}">{html.escape(txt)}</pre>' if txt.strip() else ''
        if t == 'error':
            txt = _re_ansi.sub('', '\n'.join(o.get('traceback', [])))
            return f'<pre class="out error">{html.escape(txt)}</pre>'
        d = {k: (''.join(v) if isinstance(v, list) else v) for k, v in o.get('data', {}).items()}
        if 'text/html' in d: return f'<div class="out html">{d["text/html"]}</div>'
        if 'image/svg+xml' in d: return f'<div class="out img">{d["image/svg+xml"]}</div>'
        for k in ('image/png', 'image/jpeg'):
            if k in d:
                w = (o.get('metadata', {}).get(k) or {}).get('width')
                return f'<div class="out img"><img src="data:{k};base64,{d[k].strip()}"{f" width={w}" if w else ""} alt="plot"></div>'
        if 'text/markdown' in d: return f'<div class="out md">{self.md(d["text/markdown"])}</div>'
        if 'text/latex' in d: return f'<pre class="out">{html.escape(d["text/latex"])}</pre>'
        if 'text/plain' in d: return f'<pre class="out">{html.escape(_re_ansi.sub("", d["text/plain"]))}</pre>'
        return ''

    def code(self, c):
        lines, dirs = c['source'].split('\n'), {}
        while lines and (m := _re_dir.match(lines[0])):  # quarto-style options left by the processors
            k, _, v = m.group(1).partition(':'); dirs[k.strip()] = v.strip().lower(); lines.pop(0)
        src = '\n'.join(lines).strip('\n')
        if dirs.get('include') == 'false': return ''
        parts = []
        if src and dirs.get('echo') != 'false': parts.append(f'<pre class="code"><code>{_highlight(src, "python")}</code></pre>')
        if dirs.get('output') != 'false':
            outs = ''.join(self.output(o) for o in c['outputs'])
            if outs and c.get('not_run'):
                outs = '<div class="note">Output saved in the notebook (a slow cell: not re-run by the docs build)</div>' + outs
            parts.append(outs)
        body = ''.join(parts)
        cls = 'cell sd' if dirs.get('output') == 'asis' else 'cell'
        return f'<div class="{cls}">{body}</div>' if body else ''

    def render(self, pages):
        body = ''.join(self.md(c['source']) if c['cell_type'] == 'markdown' else
                       self.code(c) if c['cell_type'] == 'code' else '' for c in self.cells)
        nav = []
        for p in pages:
            cur = p.name == self.name
            nav.append(f'<li{" class=current" if cur else ""}><a href="{_relto(self.name, p.name)}">{html.escape(p.title)}</a>')
            if cur and self.toc:
                nav.append('<ul class="toc">' + ''.join(f'<li class="l{l}"><a href="#{i}">{html.escape(html.unescape(t))}</a></li>'
                                                      for l, i, t in self.toc) + '</ul>')
            nav.append('</li>')
        summ = f'<p class="summary">{self.post(_md().renderInline(self.summary))}</p>' if self.summary else ''
        return TEMPLATE.format(title=html.escape(self.title), site=html.escape(SITE), nav=''.join(nav), summary=summ,
                               body=body, css=_relto(self.name, 'style.css'), home=_relto(self.name, 'index.html'))

def _rel_page(p): return re.sub(r'(^|/)\d+[a-zA-Z0-9]*_', r'\1', p)
def _relto(cur, tgt): return os.path.relpath(tgt, os.path.dirname(cur) or '.')

SITE = 'effnet_fastai'
TEMPLATE = '''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – {site}</title><link rel="stylesheet" href="{css}"></head>
<body><nav id="sidebar"><a class="site" href="{home}">{site}</a><ul>{nav}</ul></nav>
<main><h1 class="title">{title}</h1>{summary}{body}</main></body></html>
'''

CSS = '''body{margin:0;font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;display:flex}
#sidebar{width:250px;flex:none;height:100vh;position:sticky;top:0;overflow:auto;background:#f6f7f9;border-right:1px solid #ddd;padding:16px;box-sizing:border-box}
#sidebar .site{font-weight:700;font-size:18px;color:#222;text-decoration:none;display:block;margin-bottom:12px}
#sidebar ul{list-style:none;padding-left:0;margin:0}#sidebar li{margin:4px 0}#sidebar a{color:#2a5db0;text-decoration:none}
#sidebar li.current>a{font-weight:700;color:#111}#sidebar ul.toc{padding-left:12px;font-size:13px}#sidebar .toc li.l3{padding-left:10px}
main{max-width:980px;padding:24px 40px;min-width:0;flex:1}h1.title{margin-top:0}.summary{font-size:17px;color:#555;border-left:4px solid #ccc;padding-left:12px}
h1 a.anchor,h2 a.anchor,h3 a.anchor,h4 a.anchor{color:inherit;text-decoration:none}
pre{background:#f7f7f7;border:1px solid #e3e3e3;border-radius:4px;padding:8px 10px;overflow:auto;font-size:13px;line-height:1.4}
pre.code{background:#f3f6fa;border-color:#d6e0ee}pre.out{background:#fff}pre.stderr{background:#fff8e6}pre.error{background:#fdecec}
.cell{margin:10px 0}.cell.sd{border:1px solid #ddd;border-radius:6px;padding:2px 14px 8px;box-shadow:0 1px 2px rgba(0,0,0,.06);margin:18px 0}
.cell.sd hr{display:none}.out.html{overflow:auto}table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}code{font-size:90%}
.note{font-size:12px;color:#777;font-style:italic}.out img{max-width:100%}
.callout-note,.callout-tip,.callout-warning,.callout-important,.callout-caution{border-left:4px solid #2a5db0;background:#f3f6fa;padding:4px 12px;margin:10px 0}
.k,.kn,.kd,.kc{color:#0033b3}.s,.s1,.s2,.sa,.sd{color:#067d17}.c,.c1,.cm{color:#8c8c8c;font-style:italic}.mi,.mf{color:#1750eb}.nb,.bp{color:#000080}
.nf,.nc{color:#00627a}.o,.ow{color:#333}.nd{color:#9e880d}
'''

def doc_links(lib_path):
    "Map `Name` and `module.Name` to the page anchor nbdev gives it in `_modidx.py`"
    res = {}
    f = Path(lib_path) / '_modidx.py'
    if not f.exists(): return res
    ns = {}; exec(f.read_text(), ns)
    for mod, syms in ns['d'].get('syms', {}).items():
        for full, (url, _) in syms.items():
            short = full[len(mod) + 1:]
            res.setdefault(short, url); res.setdefault(full, url)
    return res

def build(nbs='nbs', out='_docs', run_slow=False, jobs=None, lib_path=None):
    nbs, out = Path(nbs), Path(out)
    fs = list_nbs(nbs)
    if not fs: raise SystemExit(f'no notebooks in {nbs}')
    jobs = jobs or min(len(fs), os.cpu_count() or 1)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as ex:
        results = list(ex.map(lambda f: _process_one(f, run_slow, tmp), fs))
    links = doc_links(lib_path or Path(nbs).parent / SITE)
    pages = []
    for f, ((title, summary, cells), dt) in zip(fs, results):
        name = page_name(f, nbs)
        print(f'  {f.name:28s} -> {name:18s} {dt:6.1f}s')
        pages.append(Page(name, title, summary, cells, links))
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / 'style.css').write_text(CSS)
    for p in pages:
        p.links = {k: _relto(p.name, v) for k, v in links.items()}
        dst = out / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(p.render(pages))
    if not any(p.name == 'index.html' for p in pages):  # no nbs/index.ipynb yet: a plain list of the pages
        home = Page('index.html', SITE, '', [dict(cell_type='markdown', source='\n'.join(f'- [{p.title}]({p.name})' for p in pages))], {})
        (out / 'index.html').write_text(home.render(pages))
    (out / '.nojekyll').write_text('')
    print(f'built {len(pages)} pages into {out}/ in {time.time() - t0:.0f}s')
    return pages

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--nbs', default='nbs'); ap.add_argument('--out', default='_docs')
    ap.add_argument('--slow', action='store_true', help='also run cells flagged slow/cuda (tst_flags)')
    ap.add_argument('--jobs', type=int, default=None, help='notebooks executed in parallel (default: cores)')
    ap.add_argument('--one', help=argparse.SUPPRESS); ap.add_argument('--json', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one: Path(a.json).write_text(json.dumps(process_nb(a.one, a.slow)))
    else:
        try: build(a.nbs, a.out, a.slow, a.jobs)
        except RuntimeError as e: sys.exit(str(e))
