"""A self-contained HTML page about one evaluation: summary with CIs, judge verdicts, attention figures
and a filterable list of every example with its memory and reason steps coloured.

One file, nothing fetched: CSS and JS are inline, figures are base64 PNGs, and the examples travel as a
JSON block that the page's script renders (filter by outcome and by text; the filter state lives in the
URL fragment, e.g. ``report.html#outcome=wrong&q=pasta``, so a filtered view can be shared). All text is
inserted with ``textContent``, never as markup, and the JSON block escapes ``<``, so no generated text
can break out of the page.

``collect_inspect`` reads what ``memreason inspect`` wrote; ``build_report`` turns ``Result`` rows and
those tables into HTML (pure); ``write_report`` writes it atomically; ``report_from_files`` reads a results
file and what lies beside it. Reading never changes a file.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

from memreason.errors import DataError
from memreason.io import atomic_write, read_json
from memreason.stats import wilson_ci
from memreason.traces import MEMORY, REASON, UNLABELLED, Result

# Same colours as memreason.analysis.plots.KIND_COLOURS (memory blue, reason green, unlabelled amber).
STEP_COLOURS = {"memory": "#2b6cb0", "reason": "#2f855a", "step": "#b7791f"}
OUTCOME_COLOURS = {"correct": "#2f855a", "wrong": "#c53030", "unparseable": "#718096"}
CHECKS = ("errors", "decoupling")

_CSS = """
:root { --memory: %(memory)s; --reason: %(reason)s; --step: %(step)s; --correct: %(correct)s;
        --wrong: %(wrong)s; --unparseable: %(unparseable)s; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1a202c;
       background: #f7fafc; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 24px 60px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 26px 0 8px; }
.meta { color: #4a5568; font-size: 12px; }
table { border-collapse: collapse; background: white; margin: 6px 0; }
th, td { border: 1px solid #e2e8f0; padding: 4px 10px; text-align: left; font-size: 13px; }
th { background: #edf2f7; }
.legend span { display: inline-block; margin-right: 14px; }
.pill { display: inline-block; color: white; border-radius: 4px; padding: 0 7px; font-size: 11px; font-weight: 600;
        text-transform: uppercase; letter-spacing: .03em; min-width: 62px; text-align: center; }
.pill.memory { background: var(--memory); } .pill.reason { background: var(--reason); }
.pill.step { background: var(--step); }
.badge { display: inline-block; color: white; border-radius: 10px; padding: 1px 10px; font-size: 12px;
         font-weight: 600; }
.badge.correct { background: var(--correct); } .badge.wrong { background: var(--wrong); }
.badge.unparseable { background: var(--unparseable); }
.controls { position: sticky; top: 0; background: #f7fafc; padding: 8px 0; z-index: 2; display: flex; gap: 12px;
            align-items: center; border-bottom: 1px solid #e2e8f0; }
.controls input { width: 340px; padding: 5px 8px; border: 1px solid #a0aec0; border-radius: 4px; }
.controls select { padding: 5px; }
.example { background: white; border: 1px solid #e2e8f0; border-radius: 6px; margin: 10px 0; padding: 10px 14px; }
.example header { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; font-size: 12px; color: #4a5568; }
.example .question { font-weight: 600; margin: 6px 0; }
.steps { list-style: none; padding: 0; margin: 6px 0; }
.steps li { border-left: 5px solid; padding: 3px 8px; margin: 3px 0; border-radius: 0 4px 4px 0; }
.steps li.memory { border-color: var(--memory); background: #ebf4ff; }
.steps li.reason { border-color: var(--reason); background: #f0fff4; }
.steps li.step { border-color: var(--step); background: #fffaf0; }
.steps li.faulty { outline: 2px solid var(--wrong); }
.mark { font-size: 11px; margin-left: 8px; color: #4a5568; }
.mark.bad { color: var(--wrong); font-weight: 600; }
.nosteps { color: #718096; font-style: italic; }
.verdicts { font-size: 12px; color: #2d3748; margin-top: 4px; }
.answer { font-size: 13px; }
figure { background: white; border: 1px solid #e2e8f0; padding: 8px; margin: 10px 0; }
figure img { max-width: 100%%; height: auto; }
figcaption { font-size: 12px; color: #4a5568; }
details pre { white-space: pre-wrap; background: #f7fafc; padding: 6px; font-size: 12px; }
""" % {**STEP_COLOURS, **OUTCOME_COLOURS}

_JS = r"""
(function () {
  const DATA = JSON.parse(document.getElementById('mr-data').textContent);
  const list = document.getElementById('examples');
  const outcome = document.getElementById('filter-outcome');
  const text = document.getElementById('filter-text');
  const counter = document.getElementById('shown');
  function el(tag, cls, content) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (content !== undefined && content !== null) node.textContent = String(content);
    return node;
  }
  function card(ex) {
    const art = el('article', 'example ' + ex.outcome);
    art.dataset.id = ex.id; art.dataset.outcome = ex.outcome;
    const head = el('header');
    head.appendChild(el('span', 'badge ' + ex.outcome, ex.outcome));
    head.appendChild(el('code', null, ex.id));
    head.appendChild(el('span', 'answer', 'predicted: ' + (ex.predicted === null ? '—' : ex.predicted) +
                                           ' · gold: ' + ex.gold));
    head.appendChild(el('span', null, ex.n_tokens + ' tokens'));
    art.appendChild(head);
    art.appendChild(el('div', 'question', ex.question));
    const faulty = {};
    for (const v of ex.errors) { if (v.status === 'ok' && v.first_faulty !== null) {
      (faulty[v.first_faulty] = faulty[v.first_faulty] || []).push(v.judge); } }
    if (ex.steps.length) {
      const ol = el('ol', 'steps');
      ex.steps.forEach(function (step, i) {
        const li = el('li', 'step-row ' + step.kind + (faulty[i] ? ' faulty' : ''));
        li.appendChild(el('span', 'pill ' + step.kind, step.kind));
        li.appendChild(document.createTextNode(' ' + step.text));
        if (faulty[i]) li.appendChild(el('span', 'mark bad', '✗ first faulty step (' + faulty[i].join(', ') + ')'));
        for (const d of ex.decoupling) {
          if (d.status === 'ok' && d.forms && d.forms[i]) {
            const flag = d.decoupled[i];
            li.appendChild(el('span', 'mark' + (flag === false ? ' bad' : ''),
              d.judge + ': ' + d.forms[i] + (flag === true ? ' ✓' : flag === false ? ' ✗' : '')));
          }
        }
        ol.appendChild(li);
      });
      art.appendChild(ol);
    } else {
      art.appendChild(el('div', 'nosteps', '(no steps: the model answered directly)'));
    }
    for (const v of ex.errors) {
      let line;
      if (v.status === 'ok') {
        line = v.judge + ': ' + v.source + ' error ' + (v.first_faulty === null ? '(no faulty step found)' :
               'at step ' + (v.first_faulty + 1)) + (v.explanation ? ' — ' + v.explanation : '');
      } else { line = v.judge + ': ' + v.status.replace('_', ' ') + (v.reason ? ' (' + v.reason + ')' : ''); }
      art.appendChild(el('div', 'verdicts', line));
    }
    const raw = el('details'); raw.appendChild(el('summary', null, 'raw output'));
    raw.appendChild(el('pre', null, ex.raw)); art.appendChild(raw);
    return art;
  }
  function render() {
    const want = outcome.value, query = text.value.trim().toLowerCase();
    list.textContent = '';
    let shown = 0;
    for (const ex of DATA.examples) {
      if (want !== 'all' && ex.outcome !== want) continue;
      if (query && ex.search.indexOf(query) < 0) continue;
      list.appendChild(card(ex)); shown++;
    }
    counter.textContent = 'showing ' + shown + ' of ' + DATA.examples.length;
    const state = new URLSearchParams();
    if (want !== 'all') state.set('outcome', want);
    if (query) state.set('q', query);
    try { history.replaceState(null, '', state.toString() ? '#' + state.toString() : location.pathname); }
    catch (e) { /* some file:// contexts refuse; the filter still works */ }
  }
  const initial = new URLSearchParams(location.hash.replace(/^#/, ''));
  if (initial.get('outcome')) outcome.value = initial.get('outcome');
  if (initial.get('q')) text.value = initial.get('q');
  outcome.addEventListener('change', render);
  text.addEventListener('input', render);
  render();
})();
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _pct(share) -> str:
    return "—" if share is None else f"{100 * share:.1f}%"


def _ci(ci) -> str:
    if not ci or ci[0] is None:
        return "—"
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def summary_table(rows: Sequence[Result]) -> dict:
    """Outcome counts, accuracy with a 95% Wilson CI, and steps / tokens per answer, from result rows."""
    n = len(rows)
    outcomes = Counter(row.outcome for row in rows)
    mean = (lambda values: sum(values) / n) if n else (lambda values: 0.0)
    low, high = wilson_ci(outcomes["correct"], n) if n else (None, None)
    return {"n": n, "correct": outcomes["correct"], "wrong": outcomes["wrong"],
            "unparseable": outcomes["unparseable"], "accuracy": outcomes["correct"] / n if n else None,
            "ci95": [low, high], "memory_steps": mean([row.trace.count(MEMORY) for row in rows]),
            "reason_steps": mean([row.trace.count(REASON) for row in rows]),
            "unlabelled_steps": mean([row.trace.count(UNLABELLED) for row in rows]),
            "tokens": mean([row.n_tokens for row in rows]), "marker_tokens": mean([row.marker_tokens for row in rows])}


def _read_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object (a summary ``memreason`` wrote)."""
    value = read_json(path, what=what)
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object (a {what}), got {type(value).__name__}", file=str(path))
    return value


def collect_inspect(directory: str | Path) -> dict:
    """What ``memreason inspect`` left in ``directory``: judge summaries and verdicts per check, the
    attention summary, and figures (PNG bytes with captions). Missing pieces are simply absent.

    Raises:
        DataError: a summary or verdict file there is not what ``memreason inspect`` writes.
    """
    from memreason.analysis.judges import read_verdicts

    directory = Path(directory)
    found: dict = {"figures": []}
    if not directory.is_dir():
        return found
    for check in CHECKS:
        summary_path = directory / f"{check}_summary.json"
        verdicts = {path.stem[len(check) + 1:]: read_verdicts(path)
                    for path in sorted(directory.glob(f"{check}_*.jsonl"))}
        if summary_path.is_file() or verdicts:
            summary = _read_object(summary_path, "judge summary") if summary_path.is_file() else {}
            found[check] = {"summary": summary, "verdicts": verdicts}
    attention = directory / "attention_summary.json"
    if attention.is_file():
        found["attention"] = _read_object(attention, "attention summary")
    layers = directory / "attention_layers.png"
    if layers.is_file():
        found["figures"].append(("Attention mass by layer and span kind (top; mean over heads and examples) and "
                                 "log2 enrichment over each span's share of visible tokens (bottom).",
                                 layers.read_bytes()))
    for path in sorted(directory.glob("attention_example_*.png")):
        match = re.match(r"attention_example_(.+)_L(\d+)_H(\d+)$", path.stem)
        caption = (f"Example {match.group(1)}, layer {match.group(2)}, head {match.group(3)}: attention of each "
                   "generated token (rows) on the generated tokens and the summed prompt spans (columns)."
                   if match else path.stem)
        found["figures"].append((caption, path.read_bytes()))
    return found


def _judge_tables(check: str, data: dict) -> str:
    summary = data.get("summary") or {}
    judges = summary.get("judges") or {}
    if not judges:
        return ""
    parts = []
    if check == "errors":
        parts.append("<h2>Error attribution (wrong answers)</h2><table><tr><th>judge</th><th>judged</th>"
                     "<th>memory errors</th><th>95% CI</th><th>reasoning errors</th><th>95% CI</th>"
                     "<th>no faulty step</th><th>not applicable</th><th>failed</th></tr>")
        for name, entry in judges.items():
            s = entry.get("summary") or {}
            status, m, r = s.get("status") or {}, s.get("memory") or {}, s.get("reason") or {}
            parts.append(f"<tr><td>{_e(name)}</td><td>{s.get('n', 0)}</td>"
                         f"<td>{_pct(m.get('share'))}</td><td>{_ci(m.get('ci95'))}</td>"
                         f"<td>{_pct(r.get('share'))}</td><td>{_ci(r.get('ci95'))}</td>"
                         f"<td>{s.get('at_answer', 0)}</td><td>{status.get('not_applicable', 0)}</td>"
                         f"<td>{status.get('failed', 0)}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<h2>Decoupling (does each step do what its label says?)</h2><table><tr><th>judge</th>"
                     "<th>memory steps</th><th>stating a fact</th><th>95% CI</th><th>reason steps</th>"
                     "<th>deriving something</th><th>95% CI</th><th>unlabelled steps</th></tr>")
        for name, entry in judges.items():
            s = entry.get("summary") or {}
            m, r = s.get("memory") or {}, s.get("reason") or {}
            parts.append(f"<tr><td>{_e(name)}</td><td>{m.get('n_steps', 0)}</td><td>{_pct(m.get('share'))}</td>"
                         f"<td>{_ci(m.get('ci95'))}</td><td>{r.get('n_steps', 0)}</td><td>{_pct(r.get('share'))}</td>"
                         f"<td>{_ci(r.get('ci95'))}</td><td>{s.get('unlabelled_steps', 0)}</td></tr>")
        parts.append("</table>")
    for pair, agree in (summary.get("agreement") or {}).items():
        kappa = agree.get("kappa")
        share = agree.get("agreement") or {}
        parts.append(f"<p class='meta'>Agreement {_e(pair)}: {agree.get('n', 0)} items both judged, "
                     f"{_pct(share.get('share'))} agree {_ci(share.get('ci95'))}, Cohen's kappa "
                     f"{'undefined' if kappa is None else f'{kappa:.2f}'}.</p>")
    return "".join(parts)


def _examples(rows: Sequence[Result], inspect: dict) -> list[dict]:
    verdicts = {check: {name: {v.get("id"): v for v in items}
                        for name, items in ((inspect.get(check) or {}).get("verdicts") or {}).items()}
                for check in CHECKS}
    examples = []
    for row in rows:
        steps = [{"kind": s.kind if s.kind in STEP_COLOURS else "step", "text": s.text} for s in row.steps]
        rid = row.id
        keep = ("status", "reason", "source", "first_faulty", "explanation", "forms", "decoupled")
        per_check: dict[str, list] = {check: [] for check in CHECKS}
        for check in CHECKS:
            for name, by_id in verdicts[check].items():
                if rid in by_id:
                    per_check[check].append({"judge": name, **{k: by_id[rid].get(k) for k in keep}})
        search = " ".join([str(rid), row.question or "", row.raw] + [s["text"] for s in steps]).lower()
        examples.append({"id": str(rid), "question": row.question or "", "gold": row.gold,
                         "predicted": row.predicted, "outcome": row.outcome or "unparseable",
                         "steps": steps, "raw": row.raw, "n_tokens": row.n_tokens,
                         "errors": per_check["errors"], "decoupling": per_check["decoupling"], "search": search})
    return examples


def build_report(rows: Sequence[Result], *, eval_summary: dict | None = None, inspect: dict | None = None,
                 title: str = "memreason report", source: str = "") -> str:
    """The HTML page (a string).

    Args:
        rows: ``results.jsonl`` rows (``memreason.evaluate.read_results``).
        eval_summary (dict | None): ``summary.json`` beside them (its config is shown when present).
        inspect (dict | None): from ``collect_inspect`` (judge tables, verdicts, figures).
        title (str): page title; source (str): where the rows came from (shown under the title).

    Returns:
        str: a complete, self-contained HTML document.
    """
    inspect = inspect or {"figures": []}
    s = summary_table(rows)
    config = (eval_summary or {}).get("config") or {}
    meta = " · ".join(_e(x) for x in [source, config.get("model"), config.get("task"),
                                       config.get("source") and f"{config.get('source')} ({config.get('split')})",
                                       (eval_summary or {}).get("config_hash") and
                                       f"config {(eval_summary or {}).get('config_hash')}"] if x)
    acc = "—" if s["accuracy"] is None else f"{100 * s['accuracy']:.1f}%"
    parts = [f"<h1>{_e(title)}</h1><div class='meta'>{meta}</div>",
             "<h2>Summary</h2><table><tr><th>n</th><th>accuracy</th><th>95% CI</th><th>correct</th><th>wrong</th>"
             "<th>unparseable</th><th>memory steps / answer</th><th>reason steps / answer</th>"
             "<th>unlabelled steps / answer</th><th>tokens / answer</th><th>marker tokens / answer</th></tr>",
             f"<tr><td>{s['n']}</td><td>{acc}</td><td>{_ci(s['ci95'])}</td><td>{s['correct']}</td><td>{s['wrong']}</td>"
             f"<td>{s['unparseable']}</td><td>{s['memory_steps']:.2f}</td><td>{s['reason_steps']:.2f}</td>"
             f"<td>{s['unlabelled_steps']:.2f}</td><td>{s['tokens']:.1f}</td>"
             f"<td>{s['marker_tokens']:.1f}</td></tr></table>"]
    for check in CHECKS:
        if check in inspect:
            parts.append(_judge_tables(check, inspect[check]))
    if inspect.get("figures"):
        parts.append("<h2>Attention</h2>")
        attention = inspect.get("attention") or {}
        if attention:
            parts.append(f"<p class='meta'>{attention.get('n_examples')} examples teacher-forced through "
                         f"{_e(attention.get('model'))} ({attention.get('n_layers')} layers × "
                         f"{attention.get('n_heads')} heads).</p>")
        for caption, png in inspect["figures"]:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
    legend = "".join(f"<span><span class='pill {k}'>{k}</span></span>" for k in STEP_COLOURS)
    parts.append("<h2>Examples</h2><div class='legend'>" + legend + "<span class='meta'>memory = recalls a fact, "
                 "reason = derives something, step = unlabelled</span></div>"
                 "<div class='controls'><label>outcome <select id='filter-outcome'>"
                 "<option value='all'>all</option><option value='correct'>correct</option>"
                 "<option value='wrong'>wrong</option><option value='unparseable'>unparseable</option></select>"
                 "</label><input id='filter-text' type='search' placeholder='filter by text (question, steps, id)'>"
                 "<span id='shown' class='meta'></span></div><div id='examples'></div>"
                 "<noscript>The example list needs JavaScript.</noscript>")
    payload = json.dumps({"examples": _examples(rows, inspect)}, ensure_ascii=False)
    # "<" escaped: no "</script>" (or "<!--") inside generated text can end the data block early
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>" + "".join(parts) +
            f"</main><script type='application/json' id='mr-data'>{payload}</script><script>{_JS}</script>"
            "</body></html>")


def write_report(page: str, path: str | Path) -> Path:
    """Write the page atomically (``memreason.io.atomic_write``); returns the path.

    Raises:
        ConfigError: the path is a directory, under a file, or not writable.
    """
    atomic_write(path, page)
    return Path(path)


def report_from_files(results: str | Path, *, inspect_dir: str | Path | None = None,
                      title: str | None = None) -> str:
    """Build the page from a ``results.jsonl`` (with ``summary.json`` beside it when present) and an
    inspect directory (default: ``inspect/`` beside the results).

    Raises:
        DataError: the results file is missing, holds no rows or rows that are not results, or a file
            beside it is not what memreason wrote.
    """
    from memreason.evaluate import read_results

    results = Path(results)
    if not results.exists():
        raise DataError("results file not found", file=str(results))
    rows = read_results(results)
    if not rows:
        raise DataError("no result rows", file=str(results))
    summary_path = results.parent / "summary.json"
    eval_summary = _read_object(summary_path, "summary.json") if summary_path.is_file() else None
    inspect = collect_inspect(Path(inspect_dir) if inspect_dir else results.parent / "inspect")
    return build_report(rows, eval_summary=eval_summary, inspect=inspect,
                        title=title or f"memreason report: {results.parent.name}", source=str(results))
