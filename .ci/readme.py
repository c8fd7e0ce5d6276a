"""Write README.md from nbs/index.ipynb (markdown cells as they are, code cells with their text outputs).
Quarto, which nbdev_readme needs, cannot be installed here; this keeps index.ipynb the README's source.
`python .ci/readme.py --check` fails if README.md is out of date; `--commands` prints the Quick start commands."""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def _text(out):
    if out.get('output_type') == 'stream': return None if out.get('name') == 'stderr' else ''.join(out['text'])
    data = out.get('data', {})
    return ''.join(data['text/plain']) if 'text/plain' in data else None

def render(nb_path=root/'nbs'/'index.ipynb'):
    parts = []
    for c in json.loads(Path(nb_path).read_text())['cells']:
        src = ''.join(c['source']).strip()
        if c['cell_type'] == 'markdown': parts.append(src); continue
        if re.search(r'^#\|\s*hide', src, re.M): continue
        src = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
        parts.append(f'```python\n{src}\n```')
        outs = [t for t in map(_text, c.get('outputs', [])) if t]
        if outs: parts.append('```\n' + '\n'.join(o.rstrip() for o in outs) + '\n```')
    return '\n\n'.join(parts) + '\n'

def commands(readme):
    "The two bash commands of the README's Quick start section"
    section = readme.split('## Quick start', 1)[1].split('\n## ', 1)[0]
    cmds = re.findall(r'```bash\n(.+?)\n```', section, re.S)
    assert len(cmds) == 2, f'Quick start must hold exactly two bash commands, found {len(cmds)}'
    return cmds

if __name__ == '__main__':
    text = render()
    if '--check' in sys.argv:
        if (root/'README.md').read_text() != text: sys.exit('README.md is out of date: run `python .ci/readme.py`')
    elif '--commands' in sys.argv: print(commands((root/'README.md').read_text())[int(sys.argv[-1])])
    else: (root/'README.md').write_text(text)
