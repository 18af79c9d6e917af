// Charts on our pages, drawn with the Plotly bundle served from the plotly package (no CDN).
"use strict";

const LABELS = {"train/loss": "loss", "train/cls_loss": "image-level (DINO) loss", "train/patch_loss": "patch-level (SelfPatch) loss",
                "train/lr": "learning rate", "train/img_per_s": "images / s"};

async function fetchCurves(runId, keys) {
  const query = keys.map((k) => "key=" + encodeURIComponent(k)).join("&");
  const response = await fetch(`/runs/${runId}/curves.json?${query}`, {credentials: "same-origin"});
  if (!response.ok) throw new Error(`curves of ${runId}: HTTP ${response.status}`);
  return response.json();
}

async function drawCurves(container) {
  const runs = container.dataset.runs.split(",").filter(Boolean);
  const keys = container.dataset.keys.split(",").filter(Boolean);
  const results = await Promise.all(runs.map((r) => fetchCurves(r, keys)));
  container.innerHTML = "";
  let drawn = 0;
  for (const key of keys) {
    const traces = results.filter((res) => res.curves[key]).map((res) => ({
      x: res.curves[key].steps, y: res.curves[key].values, mode: "lines", type: "scattergl",
      name: runs.length > 1 ? (res.name || res.run.slice(0, 8)) : key,
    }));
    if (!traces.length) continue;
    const div = document.createElement("div");
    div.className = "chart";
    div.dataset.metric = key;
    div.dataset.points = traces.reduce((n, t) => n + t.x.length, 0);
    container.appendChild(div);
    Plotly.newPlot(div, traces, {
      title: {text: LABELS[key] || key, font: {size: 14}}, margin: {t: 36, r: 10, b: 40, l: 55},
      xaxis: {title: {text: "step"}}, showlegend: runs.length > 1, height: 300,
    }, {displaylogo: false, responsive: true});
    drawn += 1;
  }
  if (!drawn) container.innerHTML = '<p class="muted">No metrics in MLflow yet.</p>';
  container.dataset.drawn = String(drawn);
}

function drawParcoords(el) {
  const spec = JSON.parse(el.dataset.parcoords);
  const objective = spec.dimensions[spec.dimensions.length - 1].values;
  Plotly.newPlot(el, [{
    type: "parcoords",
    line: {color: objective.map((v) => (v === null ? NaN : v)), colorscale: "Viridis", showscale: true},
    dimensions: spec.dimensions.map((d) => ({label: d.label, values: d.values.map((v) => (v === null ? NaN : v))})),
  }], {margin: {t: 40, l: 60, r: 60, b: 20}, height: 360}, {displaylogo: false, responsive: true});
}

document.addEventListener("DOMContentLoaded", () => {
  const curves = document.getElementById("curves");
  if (curves) {
    const draw = () => drawCurves(curves).catch((e) => { curves.innerHTML = `<p class="error">${e.message}</p>`; });
    draw();
    const every = Number(curves.dataset.refresh || 0);
    if (every > 0) setInterval(draw, every * 1000);
  }
  const parcoords = document.getElementById("parcoords");
  if (parcoords) drawParcoords(parcoords);
});
