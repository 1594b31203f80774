// The page of `python explore.py --serve`, in plain JavaScript: no build step, no library.
//
// It asks the server (explore_server.py) three things:
//   GET  /api/model     the checkpoint's facts, every token's text, the embedding map
//   POST /api/look      the next-token table and the attention rows the page does not hold yet
//   POST /api/continue  a sample, streamed one JSON line per piece
// and draws them: the table (1), the attention (2), the sample (3), the embeddings (4).
// Every control is also in the URL (?prompt=...&layer=...), so a view can be shared.

const $ = (id) => document.getElementById(id);
const KIND_COLOURS = {  // as in explore.py's embeddings.png
  "vowel": "#d62728", "consonant": "#1f77b4", "capital": "#2ca02c", "letter, no case": "#17becf",
  "punctuation": "#ff7f0e", "space, newline": "#9467bd", "digit": "#8c564b", "other": "#bcbd22",
  "longer token": "#7f7f7f", "byte": "#e377c2",
};
const SAMPLING = ["temperature", "top_k", "top_p", "seed", "length"];

const state = {
  model: null,      // the answer of /api/model
  ids: [],          // the prompt's token ids (the last block_size of them)
  rows: [],         // per position: [token, next token or null, p(next) or null, [[id, p], ...]]
  compareRows: null,  // the same from the --compare checkpoint
  attention: [],    // per position t: {width, data}: data[(layer * n_head + head) * width + j]
  hovered: null,    // the position whose attention is shown; null: the last one
};

// ---------------------------------------------------------------------------------------------
// Starting: read the URL, fetch the model, draw the prompt

async function start() {
  const params = new URLSearchParams(location.search);
  $("prompt").value = params.has("prompt") ? params.get("prompt") : "ROMEO:";
  for (const name of SAMPLING) {
    if (params.has(name)) $(name).value = params.get(name);
  }
  const answer = await fetch("/api/model");
  state.model = await answer.json();
  if (!answer.ok) {  // the server failed to answer (its error): say so, not "loading" for ever
    $("facts").textContent = state.model.error;
    return;
  }
  showFacts(state.model);
  fillSelect($("layer"), state.model.facts.n_layer, params.get("layer"), []);
  fillSelect($("head"), state.model.facts.n_head, params.get("head"), ["all"]);
  $("prompt").addEventListener("input", look);
  $("layer").addEventListener("change", () => { drawAttention(); saveToUrl(); });
  $("head").addEventListener("change", () => { drawAttention(); saveToUrl(); });
  $("continue").addEventListener("click", continuePrompt);
  $("use-sample").addEventListener("click", () => {
    $("prompt").value += $("sample").textContent;
    look();
  });
  $("embedding").addEventListener("mousemove", hoverEmbedding);
  await look();
  document.body.dataset.ready = "yes";  // drawn once: the browser test waits for this
}

function showFacts(model) {
  const describe = (f) => `${f.checkpoint}: ${f.parameters.toLocaleString()} parameters ` +
    `(${f.n_layer} layers, ${f.n_head} heads, n_embd ${f.n_embd}, block ${f.block_size}), ` +
    `${f.tokenizer} tokenizer of ${f.vocab_size} tokens` +
    (f.step === null ? "" : `, step ${f.step}`) +
    (f.val_loss === null ? "" : `, val loss ${f.val_loss.toFixed(4)}`) +
    (f.val_bpc === null ? "" : ` (${f.val_bpc.toFixed(3)} bits/char)`);
  $("facts").textContent = (model.compare ? "A: " : "") + describe(model.facts);
  if (model.compare) $("facts").append(document.createElement("br"), "B: " + describe(model.compare));
}

function fillSelect(select, count, chosen, extra) {
  for (const value of [...Array(count).keys(), ...extra]) {
    select.add(new Option(String(value), String(value)));
  }
  if (chosen !== null && [...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

function saveToUrl() {
  const params = new URLSearchParams({prompt: $("prompt").value, layer: $("layer").value,
                                      head: $("head").value});
  for (const name of SAMPLING) {
    if ($(name).value !== "") params.set(name, $(name).value);
  }
  history.replaceState(null, "", "?" + params.toString());
}

// ---------------------------------------------------------------------------------------------
// Asking for the table and the attention: one request at a time, the latest prompt wins

let busy = false, again = false;

async function look() {
  if (busy) { again = true; return; }
  busy = true;
  try {
    saveToUrl();
    const sent = await post("/api/look", {prompt: $("prompt").value, known: state.ids});
    const answer = await sent.json();
    if (answer.error) {
      $("message").textContent = answer.error;
    } else {
      takeAnswer(answer);
      $("message").textContent = answer.cut ? `The prompt is longer than the model's context: ` +
        `only its last ${answer.ids.length} tokens are shown (${answer.cut} cut at the start).` : "";
      drawTable();
      drawAttention();
      drawEmbedding();
    }
  } catch (error) {  // no answer at all: the server was stopped, or the network is down
    $("message").textContent = `No answer from the server (${error.message}); is it running?`;
  } finally {
    busy = false;
    if (again) { again = false; look(); }
  }
}

function post(url, body) {  // JSON, said so: the server refuses other POSTs (another site's)
  return fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                     body: JSON.stringify(body)});
}

function takeAnswer(answer) {
  // Rows before `start` are unchanged (a causal model): keep them, add the new ones.
  const T = answer.ids.length, n = state.model.facts.n_layer * state.model.facts.n_head;
  const bytes = Uint8Array.from(atob(answer.attention), (c) => c.charCodeAt(0));
  const weights = new Float32Array(bytes.buffer);  // (T - start, n_layer, n_head, T)
  state.attention.length = answer.start;
  for (let t = answer.start; t < T; t++) {
    const offset = (t - answer.start) * n * T;
    state.attention.push({width: T, data: weights.subarray(offset, offset + n * T)});
  }
  state.ids = answer.ids;
  state.rows = answer.rows;
  state.compareRows = answer.compare || null;
  if (state.hovered !== null && state.hovered >= T) state.hovered = null;
}

// ---------------------------------------------------------------------------------------------
// 1. The next-token table

const text = (id) => state.model.tokens[id];

function surpriseColour(p) {
  // 0 bits of surprise (p = 1) green, 8 bits or more (p <= 1/256) red.
  const bits = Math.min(8, -Math.log2(Math.max(p, 1e-12)));
  return `hsl(${Math.round(120 * (1 - bits / 8))}, 75%, 80%)`;
}

function drawTable() {
  const table = $("table");
  table.replaceChildren();
  state.rows.forEach((row, t) => {
    const column = element("div", "column");
    column.dataset.t = t;
    column.append(element("div", "token", text(row[0])));
    const models = state.compareRows ? [row, state.compareRows[t]] : [row];
    const pNext = element("div", "pnext");
    models.forEach((r) => pNext.append(element("div", "", r[2] === null ? "next: ?" :
                                              `${text(r[1])} ${r[2].toFixed(3)}`)));
    if (row[2] !== null) pNext.style.background = surpriseColour(row[2]);
    column.append(pNext);
    const pair = element("div", "pair");
    for (const r of models) {
      const guesses = element("ol");
      for (const [id, p] of r[3]) guesses.append(element("li", "", `${text(id)} ${p.toFixed(2)}`));
      pair.append(guesses);
    }
    if (state.compareRows) column.append(element("div", "label", "A | B"));
    column.append(pair);
    column.addEventListener("mouseenter", () => hover(t));
    table.append(column);
  });
}

function element(tag, className = "", content = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (content) node.textContent = content;
  return node;
}

// ---------------------------------------------------------------------------------------------
// 2. Attention: on the text, and as (T, T) maps

function hover(t) {
  state.hovered = t;
  drawAttention();
}

function weight(t, layer, head, j) {
  const row = state.attention[t];
  return row.data[(layer * state.model.facts.n_head + head) * row.width + j];
}

function headsShown() {
  const head = $("head").value;
  return head === "all" ? [...Array(state.model.facts.n_head).keys()] : [Number(head)];
}

function drawAttention() {
  const T = state.ids.length, layer = Number($("layer").value), heads = headsShown();
  const t = state.hovered === null ? T - 1 : state.hovered;
  const spans = $("attention-text");
  spans.replaceChildren();
  state.ids.forEach((id, j) => {
    const span = element("span", j === t ? "hovered" : "", text(id));
    if (j <= t) {  // the mean over the heads shown: one head, or all of them
      const w = heads.reduce((sum, h) => sum + weight(t, layer, h, j), 0) / heads.length;
      span.style.background = `rgba(31, 119, 180, ${w.toFixed(3)})`;
      span.title = `weight ${w.toFixed(3)}`;
    }
    span.addEventListener("mouseenter", () => hover(j));
    spans.append(span);
  });
  $("attention-note").textContent = T === 0 ? "" : `Position ${t} (${text(state.ids[t])}) ` +
    `in layer ${layer}, ${heads.length > 1 ? "the mean of all heads" : "head " + heads[0]}.`;
  document.querySelectorAll(".column").forEach((c) => c.classList.toggle("hovered", Number(c.dataset.t) === t));
  const maps = $("attention-maps");
  maps.replaceChildren();
  if (T === 0) return;
  const size = heads.length > 1 ? 260 : 560;
  for (const head of heads) {
    const figure = element("figure");
    const canvas = element("canvas");
    canvas.width = canvas.height = size;
    drawMap(canvas, layer, head, t);
    figure.append(canvas, element("figcaption", "", `layer ${layer}, head ${head}`));
    maps.append(figure);
  }
}

function drawMap(canvas, layer, head, hoveredRow) {
  // One cell per (query i, key j); darker blue = more weight, as in docs/attention.png.
  const T = state.ids.length, ctx = canvas.getContext("2d"), cell = canvas.width / Math.max(T, 1);
  ctx.fillStyle = "white";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < T; i++) {
    for (let j = 0; j <= i; j++) {
      const w = weight(i, layer, head, j);
      ctx.fillStyle = `rgb(${Math.round(255 - 224 * w)}, ${Math.round(255 - 136 * w)}, ${Math.round(255 - 75 * w)})`;
      ctx.fillRect(j * cell, i * cell, Math.ceil(cell), Math.ceil(cell));
    }
  }
  ctx.strokeStyle = "#d62728";  // the hovered position's row
  ctx.strokeRect(0, hoveredRow * cell, canvas.width, cell);
  canvas.onmousemove = (event) => {
    const i = Math.floor(event.offsetY / cell), j = Math.floor(event.offsetX / cell);
    if (i < 0 || i >= T || j < 0 || j >= T) return;
    canvas.title = j <= i ? `${text(state.ids[i])} (${i}) looks at ${text(state.ids[j])} ` +
      `(${j}): ${weight(i, layer, head, j).toFixed(3)}` : "the future: masked";
    if (i !== state.hovered) hover(i);
  };
}

// ---------------------------------------------------------------------------------------------
// 3. Continue the prompt: the server streams one JSON line per piece of text

async function continuePrompt() {
  const body = {prompt: $("prompt").value};
  for (const name of SAMPLING) {
    if ($(name).value !== "") body[name] = Number($(name).value);
  }
  saveToUrl();
  $("sample").textContent = "";
  $("message").textContent = "";
  const answer = await post("/api/continue", body);
  if (!answer.ok) {
    $("message").textContent = (await answer.json()).error;
    return;
  }
  const reader = answer.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const lines = buffer.split("\n");
    buffer = lines.pop();  // a line cut in two waits for its end
    for (const piece of lines.map((line) => JSON.parse(line))) {
      if (piece.error) $("message").textContent = piece.error;  // the stream's last line
      else $("sample").textContent += piece.text;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 4. The embedding map

function embeddingPoints(canvas) {
  // The PCA coordinates scaled to the canvas, with a margin: [[x, y], ...] in pixels.
  const coords = state.model.embedding, margin = 30;
  const xs = coords.map((c) => c[0]), ys = coords.map((c) => c[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  return coords.map(([x, y]) => [
    margin + (x - x0) / (x1 - x0 || 1) * (canvas.width - 2 * margin),
    canvas.height - margin - (y - y0) / (y1 - y0 || 1) * (canvas.height - 2 * margin)]);
}

function drawEmbedding(highlighted = null) {
  const canvas = $("embedding"), ctx = canvas.getContext("2d"), model = state.model;
  const points = embeddingPoints(canvas), inPrompt = new Set(state.ids);
  const labelAll = model.tokens.length <= 128;  // a bigger vocabulary (BPE): the prompt's only
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "bold 13px monospace";
  points.forEach(([x, y], id) => {
    ctx.fillStyle = ctx.strokeStyle = KIND_COLOURS[model.kinds[id]];
    ctx.beginPath();
    ctx.arc(x, y, 3, 0, 2 * Math.PI);
    ctx.fill();
    if (inPrompt.has(id) || id === highlighted) {
      ctx.beginPath();
      ctx.arc(x, y, 8, 0, 2 * Math.PI);
      ctx.stroke();
    }
    if (labelAll || inPrompt.has(id) || id === highlighted) ctx.fillText(model.tokens[id], x + 5, y - 4);
  });
  const [first, second] = model.explained.map((e) => Math.round(100 * e));
  $("embedding-note").textContent = `Horizontal: the first principal component (${first}% of ` +
    `the variance); vertical: the second (${second}%). Colours: ` +
    Object.keys(KIND_COLOURS).filter((k) => model.kinds.includes(k)).join(", ") + ".";
}

function hoverEmbedding(event) {
  const points = embeddingPoints(event.target);
  let nearest = null, best = 12 * 12;  // within 12 pixels
  points.forEach(([x, y], id) => {
    const d = (x - event.offsetX) ** 2 + (y - event.offsetY) ** 2;
    if (d < best) { best = d; nearest = id; }
  });
  event.target.title = nearest === null ? "" : `token ${nearest}: ${state.model.tokens[nearest]}`;
  drawEmbedding(nearest);
}

start();
