#!/usr/bin/env python
"""Build the documentation site `_docs/` from every notebook in `nbs/` with MkDocs Material and mkdocs-jupyter.

    python .ci/build_docs.py [--slow] [--jobs N] [--nbs nbs] [--out _docs]

1. Each notebook goes through nbdev's own doc processors, as `nbdev_docs` does (`show_doc` cells added after exported
   definitions, `#| hide`/`#| export` cells removed, directive comments stripped, backticked names linked), and is
   EXECUTED top to bottom with execnb in a fresh interpreter (2 notebooks at a time), so every output on the site is
   the one the current code produces. Cells flagged with a `tst_flags` flag of settings.ini (`#| slow`, `#| cuda`)
   are not run unless `--slow` is given: they keep the output committed in the notebook, marked as such. A cell that
   raises fails the build.
2. The Quarto cell options nbdev leaves (`#| echo: false`, `#| output: asis` on `show_doc` cells, `#| include: false`)
   are applied, and the notebook is written to `_docs_src/<page>.ipynb` (`02_model.ipynb` -> `model.ipynb`).
3. `mkdocs build` (mkdocs.yml: Material theme, search, mkdocs-jupyter with `execute: false`) renders `_docs/`, with
   the notebooks, index first, as the navigation. `use_directory_urls: false` keeps nbdev's page names
   (`model.html#efficientnet_b3`), so the doc links in `_modidx.py` stay valid.

This file is also MkDocs' hook module (mkdocs.yml `hooks:`): `on_page_content` gives notebook headings nbdev's
(Quarto's) anchors and rebuilds the page's table of contents from them.
"""
from __future__ import annotations
import argparse, os, re, shutil, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from html import unescape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_re_opt = re.compile(r'^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')

def page_name(nb_path, nbs):
    "nbdev's page name: `02_model.ipynb` -> `model.html` (so `_modidx` doc links resolve)"
    rel = Path(nb_path).relative_to(nbs)
    return str(rel.with_name(re.sub(r'^\d+[a-zA-Z0-9]*_', '', rel.stem) + '.html'))

def list_nbs(nbs):
    "Every notebook under `nbs`, skipping names starting with `_` or `.` (as nbdev does), index first"
    fs = [p for p in sorted(Path(nbs).rglob('*.ipynb'))
          if not any(part.startswith(('_', '.')) for part in p.relative_to(nbs).parts)]
    return sorted(fs, key=lambda p: (p.stem != 'index', str(p)))

# ---------------------------------------------------------------- step 1: nbdev's processors around a full execution
def process_nb(path, dst, page, run_slow=False):
    "Process and execute the notebook `path`; write it, ready for mkdocs-jupyter, to `dst`"
    from execnb.nbio import read_nb, write_nb, mk_cell
    from execnb.shell import CaptureShell
    from nbdev.config import get_config
    from nbdev.doclinks import NbdevLookup
    from nbdev.process import NBProcessor, _mk_procs
    from nbdev import processors as P

    class add_show_docs(P.add_show_docs):
        "nbdev's `add_show_docs`, keeping the definitions' order when one cell exports several"
        def begin(self):
            exports = [c for c in self.nb.cells if P._want_doc(c)]
            shown = {P._get_nm(t) for t in P._show_docs([t for c in self.nb.cells for t in (c.parsed_() or [])])}
            for cell in reversed(exports):
                for nm in reversed(P._def_names(cell, shown)):
                    new = P.mk_cell(f'show_doc({nm})'); new.has_sd = True
                    self.nb.cells.insert(cell.idx_ + 1, new)

    path, cfg = Path(path).absolute(), get_config()
    nb = read_nb(path)
    proc = NBProcessor(nb=nb, procs=[P.populate_language, add_show_docs])  # strips nbdev's directive comments
    proc.process()
    flags = set() if run_slow else set(re.split(r'[|\s]+', cfg.get('tst_flags', ''))) - {''}
    os.chdir(path.parent)
    sh = CaptureShell(path=path.parent)
    sh.run_cell('import warnings; warnings.filterwarnings("ignore", category=FutureWarning, module="torch")\n'
                'from nbdev.showdoc import show_doc')  # as nbdev's exec_show_docs does
    for cell in nb.cells:
        if cell.cell_type != 'code' or not cell.source.strip(): continue
        if 'nbdev_export()' in cell.source: continue  # (as nbdev's exec_show_docs: the package is not rewritten while the notebook beside this one imports it)
        d = cell.directives_
        if d.keys() & flags or d.get('eval:', [''])[0].lower() == 'false':
            why = ' '.join(sorted(d.keys() & flags)) or 'eval: false'
            if cell.get('outputs'): cell.outputs.insert(0, dict(output_type='display_data', metadata={}, data={
                'text/html': f'<p class="saved-output"><em>Output saved in the notebook (a <code>{why}</code> cell: '
                             'not re-run by the docs build)</em></p>'}))
            continue
        cell.outputs = []
        sh.cell(cell)
        if sh.exc: raise RuntimeError(f'{path.name}: cell {cell.idx_} raised {sh.exc!r}:\n{cell.source}') from sh.exc
    proc.procs = _mk_procs([P.hide_line, P.filter_stream_, P.rm_header_dash, P.clean_show_doc, P.rm_export,
                            P.clean_magics, P.hide_, P.mv_exports], nb=nb)
    proc.process()

    # step 2: apply the Quarto options nbdev left, link backticked names, point links at the pages
    lookup, cells = NbdevLookup(), []
    site = f"{cfg.get('doc_host', '')}{cfg.get('doc_baseurl', '')}".rstrip('/') + '/'
    up = os.path.relpath('.', os.path.dirname(page) or '.')
    def link(md):
        md = lookup.linkify(md).replace(f']({site}', f']({"" if up == "." else up + "/"}')
        md = re.sub(r'\]\(([^)\s:]*?)(\d+[a-zA-Z0-9]*_)?([\w-]+)\.ipynb', r'](\1\3.html', md)  # 01_demo.ipynb -> demo.html
        return re.sub(r'\[([^\]]*)\]\(([^)\s]*?)(?:#LNone)?\)\{([^}]*)\}',  # show_doc's source link: pandoc attributes
                      lambda m: f'<a href="{m.group(2)}" {m.group(3)}>{m.group(1)}</a>', md)
    for c in nb.cells:
        src = c.source
        if c.cell_type == 'code':
            lines = src.split('\n'); opts = {}
            while lines and (m := _re_opt.match(lines[0])): opts[m.group(1)] = m.group(2).lower(); lines.pop(0)
            src = '\n'.join(lines).strip('\n')
            outs = [o for o in c.get('outputs', []) if opts.get('output') != 'false']
            if opts.get('include') == 'false': continue
            if opts.get('output') == 'asis':  # show_doc: its markdown becomes part of the page
                md = ''.join(''.join(o.get('data', {}).get('text/markdown', '')) for o in outs)
                if md.strip(): cells.append(mk_cell(link(md), 'markdown'))
                continue
            hide_src = opts.get('echo') == 'false' or not src
            if hide_src and not outs: continue
            new = mk_cell(src, 'code'); new.outputs = outs; new.execution_count = None
            if hide_src: new.metadata['tags'] = ['remove_input']
            cells.append(new)
        elif c.cell_type == 'markdown' and src.strip(): cells.append(mk_cell(link(src), 'markdown'))
    nb.cells = cells
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)

def _process_one(path, dst, page, run_slow, threads=None):
    "Process `path` in a fresh interpreter (each notebook runs in a clean state, as in Jupyter), `threads` for torch"
    t = time.time()
    cmd = [sys.executable, __file__, '--one', str(path), '--dst', str(dst), '--page', page] + (['--slow'] if run_slow else [])
    env = dict(os.environ, **({'OMP_NUM_THREADS': str(threads)} if threads and 'OMP_NUM_THREADS' not in os.environ else {}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode: raise RuntimeError(f'docs build failed on {path}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}')
    return time.time() - t

# ---------------------------------------------------------------- step 3: MkDocs
def build(nbs='nbs', out='_docs', run_slow=False, jobs=2, config=ROOT / 'mkdocs.yml'):
    "Build the site from the notebooks in `nbs` into `out` (the processed notebooks go to `<out>_src/`)"
    import logging
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    logging.basicConfig(format='mkdocs %(levelname)s: %(message)s', level=logging.WARNING)
    logging.getLogger('traitlets').addFilter(lambda r: 'Alternative text' not in r.getMessage())  # plots: nbconvert adds one
    nbs, out = Path(nbs).absolute(), Path(out).absolute()
    src = out.with_name(out.name + '_src')
    fs = list_nbs(nbs)
    if not fs: raise SystemExit(f'no notebooks in {nbs}')
    pages = [page_name(f, nbs) for f in fs]
    t0 = time.time()
    if src.exists(): shutil.rmtree(src)
    # Notebooks run `jobs` at a time, each with its share of the cores as torch threads (OMP_NUM_THREADS, unless set):
    # more threads than cores make torch's threads wait for each other.
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(jobs) as ex:
        dts = list(ex.map(lambda f, p: _process_one(f, src / Path(p).with_suffix('.ipynb'), p, run_slow, threads), fs, pages))
    for f, p, dt in zip(fs, pages, dts): print(f'  {f.name:28s} -> {p:18s} {dt:6.1f}s')
    t1 = time.time()
    nav = [str(Path(p).with_suffix('.ipynb')) for p in pages]
    if 'index.html' not in pages:  # no nbs/index.ipynb yet: a plain list of the pages
        (src / 'index.md').write_text(f'# {load_config(str(config)).site_name}\n\n' +
                                      '\n'.join(f'- [{Path(p).stem}]({p})' for p in pages) + '\n')
        nav.insert(0, 'index.md')
    mkdocs_build(load_config(str(config), docs_dir=str(src), site_dir=str(out), nav=nav))
    print(f'built {len(pages)} pages into {out}/: notebooks {t1 - t0:.0f}s, mkdocs {time.time() - t1:.0f}s')
    return pages

# ---------------------------------------------------------------- MkDocs hook (mkdocs.yml `hooks:`)
def _anchor(text):
    "Pandoc's (Quarto's, so nbdev's `_modidx`) identifier for a heading's text"
    s = re.sub(r'[^\w\-. ]', '', unescape(re.sub(r'<[^>]+>', '', text))).strip().lower()
    return re.sub(r'^[^a-z]+', '', re.sub(r'\s+', '-', s)) or 'section'

def on_page_content(html, page, config, files):
    if not page.file.src_path.endswith('.ipynb'): return html
    from mkdocs.structure.toc import get_toc
    seen, toc, stack = set(), [], []
    def head(m):
        lvl, attrs = int(m.group(1)), re.sub(r'\s+id="[^"]*"', '', m.group(2) or '')
        inner = re.sub(r'<a class="anchor-link"[^>]*>.*?</a>', '', m.group(3), flags=re.S)
        i = base = _anchor(inner); k = 0
        while i in seen: k += 1; i = f'{base}-{k}'
        seen.add(i)
        tok = dict(level=lvl, id=i, name=re.sub(r'<[^>]+>', '', inner).strip(), children=[])
        while stack and stack[-1]['level'] >= lvl: stack.pop()
        (stack[-1]['children'] if stack else toc).append(tok); stack.append(tok)
        return f'<h{lvl} id="{i}"{attrs}>{inner}<a class="headerlink" href="#{i}" title="Permanent link">&para;</a></h{lvl}>'
    html = re.sub(r'<h([1-6])(\s[^>]*)?>(.*?)</h\1>', head, html, flags=re.S)
    page.toc = get_toc(toc)
    # the copy button's notice and the hidden copy of each cell's source stay out of the search index
    return re.sub(r'<div class="(zeroclipboard-container|clipboard-copy-txt)"', r'<div data-search-exclude class="\1"', html)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--nbs', default='nbs'); ap.add_argument('--out', default='_docs')
    ap.add_argument('--slow', action='store_true', help='also run cells flagged slow/cuda (tst_flags)')
    ap.add_argument('--jobs', type=int, default=2, help='notebooks executed in parallel (default: 2)')
    ap.add_argument('--one', help=argparse.SUPPRESS); ap.add_argument('--dst', help=argparse.SUPPRESS)
    ap.add_argument('--page', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one: process_nb(a.one, a.dst, a.page, a.slow)
    else:
        try: build(a.nbs, a.out, a.slow, a.jobs)
        except RuntimeError as e: sys.exit(str(e))
