"""A self-contained HTML page for report.json: tables plus the PNG plots inlined."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

# Where the gate's decision goes once the run is judged (pipeline.runs.promotion).
GATE_START, GATE_END = "<!-- gate -->", "<!-- /gate -->"


def _row(name: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return f"<tr><th>{html.escape(name)}</th><td>{html.escape(str(value))}</td></tr>"


def _table(title: str, values: dict[str, Any]) -> str:
    rows = "".join(_row(k, v) for k, v in values.items() if not isinstance(v, (list, dict)))
    return f"<h2>{html.escape(title)}</h2><table>{rows}</table>"


def render_html(report: dict[str, Any], plot_dir: Path) -> str:
    test, posterior = report["test"], report["posterior"]
    likelihood = test.get("likelihood", "bernoulli")
    floor_nats = report["context"]["reconstruction_floor"]
    floor = "Mean" if floor_nats is None else f"Reconstruction floor {floor_nats:.1f}, mean"
    verdict = (
        "<p class=bad>Posterior collapse: " + html.escape("; ".join(posterior["collapse_reasons"])) + "</p>"
        if posterior["posterior_collapse"]
        else f"<p class=good>{posterior['active_units']} of {posterior['latent_dim']} latent units active.</p>"
    )
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode((Path(plot_dir) / name).read_bytes()).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name in report.get("plots", [])
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>VAE evaluation report</title>
<style>
body {{ font-family: sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 10px; text-align: left; }}
th {{ background: #f4f4f4; font-weight: normal; }}
.bad {{ color: #b00; font-weight: bold; }} .good {{ color: #070; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 460px; }}
</style></head><body>
<h1>VAE evaluation report</h1>
<p>Test negative ELBO <b>{test["neg_elbo"]:.2f}</b> nats per image
({test["neg_elbo_bits_per_dim"]:.4f} bits/dim); importance-weighted bound (k={test["iwae_k"]})
<b>{test["neg_iwae"]:.2f}</b> nats, under the <b>{likelihood.replace("_", " ")}</b> likelihood
(numbers compare only with models of the same likelihood). {floor}-image baseline
{report["context"]["mean_image_baseline"]:.1f} nats.</p>
{verdict}
{_table("Test set (nats per image)", test)}
{_table("Context", report["context"])}
{_table("Latent clustering", report["clustering"])}
{_table("Posterior", posterior)}
{GATE_START}{GATE_END}
<h2>Plots</h2>{images}
</body></html>
"""


def gate_section(decision: dict[str, Any]) -> str:
    """The gate's decision as HTML: passed or not and why, and the numbers compared."""
    verdict = "passed" if decision.get("passed") else "failed"
    if decision.get("how") == "manual":
        verdict += ", promoted by hand"
    elif decision.get("promoted"):
        verdict += ", promoted to champion"
    reasons = "".join(f"<li>{html.escape(reason)}</li>" for reason in decision.get("reasons", []))
    champion = decision.get("champion") or {}
    rows = {f"this run: {k}": v for k, v in decision.get("metrics", {}).items()}
    rows.update({f"champion {champion.get('run')}: {k}": v for k, v in champion.get("metrics", {}).items()})
    css = "good" if decision.get("passed") else "bad"
    return (
        f"<h2>Gate</h2><p class={css}>Gate {html.escape(verdict)}. {html.escape(decision.get('note', ''))}</p>"
        f"{f'<ul>{reasons}</ul>' if reasons else ''}{_table('Gate numbers', rows)}"
    )


def with_gate_section(page: str, decision: dict[str, Any]) -> str:
    """`page` (a report.html) with its gate section replaced by this decision."""
    section = GATE_START + gate_section(decision) + GATE_END
    if GATE_START in page and GATE_END in page:
        head, rest = page.split(GATE_START, 1)
        return head + section + rest.split(GATE_END, 1)[1]
    return page.replace("</body>", section + "</body>", 1)
