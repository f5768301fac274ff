"use strict";
// The review pages: worklist, study view (images, findings, feedback), monitoring. Everything shown
// comes from the app's JSON API under {prefix}/api; text is inserted as text, never as HTML.
const PREFIX = document.body.dataset.prefix || "";
const PAGE = document.body.dataset.page;
const FILTERS = ["op", "body_part", "label", "date_from", "date_to", "reviewed", "sort"];

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
                                      : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") node.addEventListener("click", v); else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(PREFIX + "/api/" + path, Object.assign({credentials: "same-origin"}, options));
  if (response.status === 401) { location.href = PREFIX + "/login"; throw new Error("not signed in"); }
  let body = null;
  try { body = await response.json(); } catch (e) { body = {error: `HTTP ${response.status}`}; }
  if (!response.ok) {
    const error = new Error(body.error || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function pct(p) { return p === null || p === undefined ? "—" : (100 * p).toFixed(1) + "%"; }
function filterParams() {
  const params = new URLSearchParams(location.search);
  const out = new URLSearchParams();
  for (const k of FILTERS) if (params.get(k)) out.set(k, params.get(k));
  return out;
}

// ------------------------------------------------------------------ worklist
async function worklist() {
  const params = new URLSearchParams(location.search);
  let run;
  try { run = await api("run"); } catch (e) { showError(e.message); return; }
  const done = run.complete ? "" : " (summary.json missing: the run is unfinished or was interrupted)";
  document.getElementById("run-info").textContent =
    `${run.run} — ${run.studies} studies${done}; feedback: ${run.feedback_store}`;
  const op = document.getElementById("op");
  for (const p of run.operating_points) op.append(el("option", {value: p}, p === "run" ? "as scored (run's thresholds)" : p));
  const body = document.getElementById("body_part");
  for (const b of run.body_parts) body.append(el("option", {value: b}, b));
  for (const k of FILTERS) if (params.get(k)) document.getElementById(k).value = params.get(k);
  if (run.unavailable && run.unavailable.date) {
    for (const k of ["date_from", "date_to"]) document.getElementById(k).disabled = true;
    const n = document.getElementById("notice");
    n.textContent = "Date filter unavailable: " + run.unavailable.date + ".";
    n.hidden = false;
  }
  document.getElementById("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const out = new URLSearchParams();
    for (const k of FILTERS) { const v = document.getElementById(k).value; if (v) out.set(k, v); }
    location.search = out.toString();
  });
  const page = parseInt(params.get("page") || "1", 10);
  let data;
  try {
    const q = filterParams(); q.set("page", page);
    data = await api("worklist?" + q.toString());
  } catch (e) { showError(e.message); return; }
  document.getElementById("count").textContent = `${data.total} studies match; page ${data.page} of ${data.pages}`;
  const tbody = document.querySelector("#worklist tbody");
  const rows = [];
  for (const s of data.studies) {
    const q = filterParams(); q.set("id", s.study_id);
    const href = PREFIX + "/study?" + q.toString();
    const tr = el("tr", {class: s.flagged ? "flagged" : "", "data-href": href, "data-study": s.study_id},
      el("td", {title: s.flagged ? "flagged at this operating point" : ""}),
      el("td", {}, el("a", {href: href, class: "study-link"}, s.study_id)),
      el("td", {}, s.body_part || "—"),
      el("td", {}, pct(s.probability)),
      el("td", {}, s.threshold === null ? "—" : s.threshold.toFixed(3)),
      el("td", {}, `${s.scored}/${s.images}`),
      el("td", {}, s.study_date || "—"),
      el("td", {class: "reviewed"}, s.reviewed ? "✓" : ""));
    tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") location.href = href; });
    tbody.append(tr); rows.push(tr);
  }
  if (!rows.length) tbody.append(el("tr", {}, el("td", {colspan: 8}, "No study matches these filters.")));
  const go = (p) => { const q = new URLSearchParams(location.search); q.set("page", p); location.search = q.toString(); };
  document.getElementById("page").textContent = `${data.page} / ${data.pages}`;
  document.getElementById("prev-page").disabled = data.page <= 1;
  document.getElementById("next-page").disabled = data.page >= data.pages;
  document.getElementById("prev-page").onclick = () => go(data.page - 1);
  document.getElementById("next-page").onclick = () => go(data.page + 1);
  let selected = -1;
  const select = (i) => {
    if (!rows.length) return;
    if (selected >= 0) rows[selected].classList.remove("selected");
    selected = Math.max(0, Math.min(rows.length - 1, i));
    rows[selected].classList.add("selected");
    rows[selected].scrollIntoView({block: "nearest"});
  };
  document.addEventListener("keydown", (ev) => {
    if (["INPUT", "SELECT"].includes(ev.target.tagName)) return;
    if (ev.key === "j" || ev.key === "ArrowDown") { select(selected + 1); ev.preventDefault(); }
    if (ev.key === "k" || ev.key === "ArrowUp") { select(selected - 1); ev.preventDefault(); }
    if (ev.key === "Enter" && selected >= 0) location.href = rows[selected].dataset.href;
  });
}

// ------------------------------------------------------------------ study view
let STUDY = null;
let DRAWING = null;   // {image, svg} while a missed fracture is being drawn

function reviewer() {
  const name = document.getElementById("reviewer").value.trim();
  if (!name) { document.getElementById("reviewer").focus(); throw new Error("Enter your name as reviewer first."); }
  localStorage.setItem("fracray-reviewer", name);
  return name;
}

async function record(body) {
  const saved = document.getElementById("saved");
  try {
    body.reviewer = reviewer();
    const got = await api("feedback", {method: "POST", headers: {"Content-Type": "application/json"},
                                       body: JSON.stringify(body)});
    saved.textContent = `Saved: ${got.verdict}` + (got.finding !== null ? ` (finding ${got.finding + 1})` : "") +
                        ` by ${got.reviewer}`;
    showError("");
    await refreshFeedback();
  } catch (e) { saved.textContent = ""; showError(e.message); }
}

async function refreshFeedback() {
  const q = filterParams(); q.set("id", STUDY.study_id);
  const study = await api("study?" + q.toString());
  STUDY.feedback = study.feedback;
  renderFeedback();
}

function imageName(uri) { return uri.split("/").slice(-2).join("/"); }

function renderFeedback() {
  const list = document.getElementById("feedback-list");
  list.replaceChildren();
  if (!STUDY.feedback.length) list.append(el("li", {}, "none yet"));
  for (const f of STUDY.feedback) {
    const what = f.verdict === "missed" ? `missed fracture [${f.box.map(Math.round).join(", ")}] on ${imageName(f.image_id)}`
      : f.finding !== null ? `${f.verdict} with finding ${f.finding + 1} on ${imageName(f.image_id)}`
      : f.image_id ? `${f.verdict} with image ${imageName(f.image_id)}` : `${f.verdict} with the study`;
    const del = el("button", {class: "delete", onclick: async () => {
      try { await api(`feedback/${f.id}`, {method: "DELETE"}); await refreshFeedback(); } catch (e) { showError(e.message); }
    }}, "remove");
    list.append(el("li", {class: "feedback-item", "data-verdict": f.verdict},
      `${what} — ${f.reviewer}, ${f.created_at.replace("T", " ").slice(0, 19)} UTC `, del));
  }
  // the missed boxes over the images
  for (const fig of document.querySelectorAll("figure.image")) {
    const svg = fig.querySelector("svg");
    if (!svg) continue;
    svg.querySelectorAll("rect.missed").forEach((r) => r.remove());
    for (const f of STUDY.feedback) {
      if (f.verdict !== "missed" || f.image_id !== fig.dataset.uri) continue;
      const [x0, y0, x1, y1] = f.box;
      svg.append(el("svg:rect", {class: "missed", x: x0, y: y0, width: x1 - x0, height: y1 - y0}));
    }
  }
}

function startDrawing(fig, image) {
  const svg = fig.querySelector("svg");
  if (!svg) return;
  DRAWING = {image, svg};
  svg.classList.add("drawing");
  document.getElementById("saved").textContent = "Drag a box around the missed fracture (Esc cancels).";
}

function stopDrawing() {
  if (DRAWING) DRAWING.svg.classList.remove("drawing");
  DRAWING = null;
}

function svgPoint(svg, ev) {
  const r = svg.getBoundingClientRect();
  const [, , w, h] = svg.getAttribute("viewBox").split(" ").map(Number);
  return [Math.max(0, Math.min(w, (ev.clientX - r.left) * w / r.width)),
          Math.max(0, Math.min(h, (ev.clientY - r.top) * h / r.height))];
}

function imageFigure(image, index) {
  const fig = el("figure", {class: "image", "data-uri": image.image_uri, id: `image-${index}`});
  const caption = el("figcaption");
  caption.append(el("strong", {}, imageName(image.image_uri)), " — ",
    image.status === "ok" ? `P(fracture) ${pct(image.fracture_probability)} (threshold ${image.threshold?.toFixed(3)}), ` +
      `${image.body_part || "body part unknown"}` : `not scored: ${image.status} ${image.error || ""}`);
  fig.append(caption);
  if (image.status !== "ok") return fig;
  const viewer = el("div", {class: "viewer"});
  const q = new URLSearchParams({study: STUDY.study_id, uri: image.image_uri});
  const img = el("img", {alt: "radiograph " + imageName(image.image_uri), src: PREFIX + "/api/image?" + q.toString()});
  const w = image.width || 1, h = image.height || 1;
  const svg = el("svg:svg", {viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none"});
  (image.findings || []).forEach((f, i) => {
    svg.append(el("svg:rect", {class: "finding", x: f.x0, y: f.y0, width: f.x1 - f.x0, height: f.y1 - f.y0}));
    svg.append(el("svg:text", {x: f.x0 + 3, y: Math.max(14, f.y0 - 4)}, `${i + 1}: ${(100 * f.score).toFixed(0)}%`));
  });
  let start = null, live = null;
  svg.addEventListener("mousedown", (ev) => {
    if (!DRAWING || DRAWING.svg !== svg) return;
    start = svgPoint(svg, ev);
    live = el("svg:rect", {class: "missed", x: start[0], y: start[1], width: 0, height: 0});
    svg.append(live); ev.preventDefault();
  });
  svg.addEventListener("mousemove", (ev) => {
    if (!start) return;
    const p = svgPoint(svg, ev);
    live.setAttribute("x", Math.min(start[0], p[0])); live.setAttribute("y", Math.min(start[1], p[1]));
    live.setAttribute("width", Math.abs(p[0] - start[0])); live.setAttribute("height", Math.abs(p[1] - start[1]));
  });
  svg.addEventListener("mouseup", async (ev) => {
    if (!start) return;
    const p = svgPoint(svg, ev);
    const box = [Math.min(start[0], p[0]), Math.min(start[1], p[1]), Math.max(start[0], p[0]), Math.max(start[1], p[1])];
    start = null; live.remove(); stopDrawing();
    if (box[2] - box[0] < 3 || box[3] - box[1] < 3) { showError("The box is too small: drag across the fracture."); return; }
    await record({study_id: STUDY.study_id, image_id: image.image_uri, verdict: "missed", box: box.map(Math.round)});
  });
  img.addEventListener("error", async () => {
    let message = "The image cannot be shown.";
    try { await api("image?" + q.toString()); } catch (e) { message = e.message; }
    viewer.replaceChildren(el("div", {class: "image-error", role: "alert"}, message));
  });
  viewer.append(img, svg);
  fig.append(viewer);
  const actions = el("div", {class: "feedback"},
    el("button", {class: "image-agree", onclick: () => record({study_id: STUDY.study_id, image_id: image.image_uri,
                                                              verdict: "agree"})}, "Agree with image"),
    el("button", {class: "image-disagree", onclick: () => record({study_id: STUDY.study_id, image_id: image.image_uri,
                                                                 verdict: "disagree"})}, "Disagree with image"),
    el("button", {class: "draw-missed", onclick: () => startDrawing(fig, image)}, "Draw missed fracture"));
  fig.append(actions);
  const list = el("ol", {class: "findings"});
  (image.findings || []).forEach((f, i) => {
    list.append(el("li", {}, `finding ${i + 1}: score ${(100 * f.score).toFixed(0)}%, box [${f.x0}, ${f.y0}, ${f.x1}, ${f.y1}] `,
      el("button", {class: "finding-agree", onclick: () => record({study_id: STUDY.study_id, image_id: image.image_uri,
                                                                   finding: i, verdict: "agree"})}, "agree"), " ",
      el("button", {class: "finding-disagree", onclick: () => record({study_id: STUDY.study_id, image_id: image.image_uri,
                                                                      finding: i, verdict: "disagree"})}, "disagree")));
  });
  if (!(image.findings || []).length) list.append(el("li", {}, image.findings === null ? "no findings recorded" : "no findings"));
  fig.append(list);
  return fig;
}

async function study() {
  const params = new URLSearchParams(location.search);
  const back = filterParams();
  document.getElementById("back").href = PREFIX + "/?" + back.toString();
  document.getElementById("reviewer").value = localStorage.getItem("fracray-reviewer") || "";
  try {
    STUDY = await api("study?" + params.toString());
  } catch (e) { showError(e.message); return; }
  document.title = "fracray review: " + STUDY.study_id;
  const models = STUDY.images.map((i) => i.classifier).filter((c) => c);
  const summary = document.getElementById("summary");
  summary.append(
    el("h2", {id: "study-id"}, STUDY.study_id),
    el("p", {},
      el("span", {class: "flag " + (STUDY.flagged ? "yes" : "no"), id: "flag"}, STUDY.flagged ? "FLAGGED" : "not flagged"),
      ` P(fracture) ${pct(STUDY.probability)} at threshold ${STUDY.threshold === null ? "—" : STUDY.threshold.toFixed(3)} ` +
      `(operating point: ${STUDY.operating_point === "run" ? "as scored" : STUDY.operating_point}); ` +
      `${STUDY.body_part || "body part unknown"}; ${STUDY.scored}/${STUDY.image_count} images scored; ` +
      `date ${STUDY.study_date || "not recorded"}`),
    el("p", {class: "hint"}, `Model: ${[...new Set(models)].join(", ") || "—"}` +
      (STUDY.images[0]?.router ? `; router ${STUDY.images[0].router}` : "") +
      (STUDY.images[0]?.engine ? `; engine ${STUDY.images[0].engine}` : "")));
  const n = STUDY.neighbours;
  document.getElementById("position").textContent = n.position ? `study ${n.position} of ${n.total}` : "";
  const images = document.getElementById("images");
  STUDY.images.forEach((image, i) => images.append(imageFigure(image, i)));
  renderFeedback();
  for (const b of document.querySelectorAll("#study-feedback button")) {
    b.addEventListener("click", () => record({study_id: STUDY.study_id, verdict: b.dataset.verdict}));
  }
  const goto = (id) => { if (!id) return; const q = filterParams(); q.set("id", id); location.href = PREFIX + "/study?" + q.toString(); };
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT") { if (ev.key === "Escape") ev.target.blur(); return; }
    if (ev.key === "Escape") stopDrawing();
    if (ev.key === "n" || ev.key === "ArrowRight") goto(n.next);
    if (ev.key === "p" || ev.key === "ArrowLeft") goto(n.previous);
    if (ev.key === "a") record({study_id: STUDY.study_id, verdict: "agree"});
    if (ev.key === "d") record({study_id: STUDY.study_id, verdict: "disagree"});
    if (ev.key === "u") location.href = document.getElementById("back").href;
    if (ev.key === "m") {
      const fig = document.querySelector("figure.image"); const first = STUDY.images.find((i) => i.status === "ok");
      if (fig && first) startDrawing(fig, first);
    }
  });
}

// ------------------------------------------------------------------ monitoring
async function monitoring() {
  const loading = document.getElementById("loading");
  let data;
  try { data = await api("monitoring"); } catch (e) { loading.hidden = true; showError(e.message); return; }
  loading.hidden = true;
  summarise(data.report);
  const plots = document.getElementById("plots");
  // The run over time first, then by body part and equipment, then the reviewers' concordance.
  const rank = (n) => ["day", "body_part", "equipment", "concordance"].findIndex((k) => n.startsWith(k));
  data.plots.sort((a, b) => ((rank(a) + 5) % 5) - ((rank(b) + 5) % 5) || a.localeCompare(b));
  for (const name of data.plots) {
    plots.append(el("h3", {}, name.replace(/_/g, " ")),
                 el("img", {alt: name, src: PREFIX + "/api/monitoring/plot/" + encodeURIComponent(name)}));
  }
  document.getElementById("report").textContent = JSON.stringify(data.report, null, 2);
  document.getElementById("report-details").hidden = false;
  if (!data.plots.length) document.getElementById("report-details").open = true;
}

// What a monitoring page is read for, before any plot: is there an alarm, how much was scored, how
// far the scores are from the model's validation distribution (PSI), what the reviewers say.
function summarise(report) {
  const box = document.getElementById("summary");
  if (!report || !report.overall) return;
  const o = report.overall, d = report.drift || {}, pct = (x) => (100 * x).toFixed(1) + "%";
  const alarms = report.alarms || [];
  const status = alarms.length ? el("p", {class: "alarm", role: "alert"},
      `${alarms.length} alarm${alarms.length > 1 ? "s" : ""}: ` +
      alarms.map((a) => typeof a === "string" ? a : (a.message || JSON.stringify(a))).join("; "))
    : el("p", {class: "ok"}, "No alarm.");
  const psi = o.psi === null || o.psi === undefined ? "n/a"
    : `${o.psi.toFixed(3)} (${o.psi_level}; warn ${d.warn}, alarm ${d.alarm}; chance alone ~${(o.psi_noise_floor ?? 0).toFixed(3)})`;
  const rows = [
    ["Images", `${o.images}: ${o.scored} scored, ${o.rejected} rejected, ${o.out_of_scope} out of scope`],
    ["Flagged (positive rate)", o.scored ? `${o.positive} (${pct(o.positive / o.scored)})` : "n/a"],
    ["Mean P(fracture)", o.mean_probability === null || o.mean_probability === undefined ? "n/a" : o.mean_probability.toFixed(3)],
    ["Drift: PSI against validation", psi],
  ];
  const c = report.concordance;
  const rate = (r) => !r || r.value === null || r.value === undefined ? "n/a"
    : `${pct(r.value)} (95% CI ${r.ci95 ? pct(r.ci95[0]) + "-" + pct(r.ci95[1]) : "n/a"})`;
  rows.push(["Concordance with reviewers", c && c.decided_studies
    ? `${c.decided_studies} reviewed studies decided (TP ${c.tp}, FP ${c.fp}, TN ${c.tn}, FN ${c.fn}): ` +
      `sensitivity ${rate(c.sensitivity)}, specificity ${rate(c.specificity)}`
    : "no reviewed studies yet"]);
  const table = el("table", {class: "facts"}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))));
  const notes = el("ul", {class: "notes"}, ...(report.notes || []).map((n) => el("li", {}, n)));
  box.replaceChildren(el("h2", {}, "Summary"), status, table, notes);
  box.hidden = false;
}

({worklist, study, monitoring})[PAGE]?.();
