"use strict";
// The page: three views over the JSON API under /api. A query or prompt is an ordered list of
// pieces (typed text, dropped files) sent as one multipart form; whatever comes back is drawn
// with textContent and element attributes only, never parsed as HTML.

const $ = (id) => document.getElementById(id);
const MAX_ENTROPY = 3; // nats at the red end of the colour scale

async function api(url, options = {}) {
  const res = await fetch(url, options);
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON: the status says enough */ }
  if (!res.ok) throw new Error(body && body.error ? body.error : `${res.status} ${res.statusText}`);
  return body;
}

function showError(box, error) {
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// ---- pieces ------------------------------------------------------------------------------------

class Pieces {
  // options.weights: each piece has a weight (search); options.reorder: pieces can move (prompts)
  constructor(root, options) {
    this.root = root;
    this.options = options;
    this.items = [];
  }

  addText(text = "") {
    this.items.push({ kind: "text", text, weight: 1 });
    this.render();
  }

  addFiles(files) {
    for (const file of files) {
      const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("audio/") ? "sound" : "file";
      this.items.push({ kind, file, weight: 1, url: URL.createObjectURL(file) });
    }
    this.render();
  }

  remove(i) {
    const [gone] = this.items.splice(i, 1);
    if (gone.url) URL.revokeObjectURL(gone.url);
    this.render();
  }

  move(i, by) {
    const j = i + by;
    if (j < 0 || j >= this.items.length) return;
    [this.items[i], this.items[j]] = [this.items[j], this.items[i]];
    this.render();
  }

  // Each piece and its text now, as a form is built from them (see removeSent).
  snapshot() {
    return this.items.map((item) => ({ item, text: item.text }));
  }

  // Remove the pieces of `snapshot` still as they were sent: pieces added or typed into while the
  // request ran stay (clearing them all lost what the user added meanwhile).
  removeSent(snapshot) {
    const sent = new Set(snapshot.filter((s) => s.item.text === s.text).map((s) => s.item));
    for (const item of sent) if (item.url) URL.revokeObjectURL(item.url);
    this.items = this.items.filter((item) => !sent.has(item));
    if (this.items.length) this.render();
    else this.addText();
  }

  render() {
    this.root.replaceChildren(...this.items.map((item, i) => this.row(item, i)));
  }

  row(item, i) {
    const row = el("div", { className: "piece", "data-kind": item.kind });
    row.append(el("span", { className: "kind", text: item.kind }));
    if (item.kind === "text") {
      const input = el("input", { type: "text", value: item.text, placeholder: "type text", className: "text" });
      input.addEventListener("input", () => { item.text = input.value; });
      row.append(input);
    } else {
      if (item.kind === "image") row.append(el("img", { src: item.url, alt: item.file.name }));
      if (item.kind === "sound") row.append(el("audio", { src: item.url, controls: true, preload: "none" }));
      row.append(el("span", { className: "name", text: `${item.file.name} (${(item.file.size / 1024).toFixed(0)} KB)` }));
    }
    if (this.options.weights) {
      const weight = el("input", { type: "number", step: "0.1", value: String(item.weight), className: "weight",
                                   title: "weight (negative: not like this)" });
      weight.addEventListener("input", () => { item.weight = weight.value; });
      row.append(weight);
    }
    if (this.options.reorder) {
      const up = el("button", { type: "button", text: "↑", title: "earlier" });
      const down = el("button", { type: "button", text: "↓", title: "later" });
      up.addEventListener("click", () => this.move(i, -1));
      down.addEventListener("click", () => this.move(i, 1));
      row.append(up, down);
    }
    const remove = el("button", { type: "button", text: "×", title: "remove", className: "remove" });
    remove.addEventListener("click", () => this.remove(i));
    row.append(remove);
    return row;
  }

  // Append the pieces to `form` in order (empty texts left out), and their weights.
  appendTo(form) {
    const used = this.items.filter((item) => item.kind !== "text" || pythonStrip(item.text));
    for (const item of used) {
      if (item.kind === "text") form.append("text", item.text);
      else form.append("file", item.file, item.file.name);
    }
    if (this.options.weights) form.append("weights", used.map((item) => item.weight).join(","));
    return used.length;
  }
}

// What the server's str.strip() leaves (JS's trim() keeps U+001C–U+001F and U+0085, which Python
// strips: a piece of them was sent, dropped by the server, and its weight then had no piece).
function pythonStrip(text) {
  return text.replace(/^[\s\x1c-\x1f\x85]+|[\s\x1c-\x1f\x85]+$/g, "");
}

function wireBuilder(prefix, options) {
  const pieces = new Pieces($(`${prefix}-pieces`), options);
  const drop = $(`${prefix}-drop`);
  const input = $(`${prefix}-files`);
  input.addEventListener("change", () => { pieces.addFiles(input.files); input.value = ""; });
  $(`${prefix}-add-text`).addEventListener("click", () => pieces.addText());
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pieces.addFiles(e.dataTransfer.files);
  });
  pieces.addText();
  return pieces;
}

// ---- tabs and status -------------------------------------------------------------------------------

function showView(name) {
  if ($(`tab-${name}`).hidden) name = "search"; // /#memory on a server without --memory showed the view
  for (const tab of document.querySelectorAll("nav button")) {
    const on = tab.dataset.view === name;
    tab.setAttribute("aria-selected", String(on));
    $(`view-${tab.dataset.view}`).hidden = !on;
  }
  if (name === "memory") refreshMemory();
}

async function pollStatus() {
  let status;
  try {
    status = await api("/api/status");
  } catch (error) {
    $("index-text").textContent = `server unreachable: ${error.message}`;
    setTimeout(pollStatus, 2000);
    return;
  }
  $("run-name").textContent = status.run;
  $("tab-memory").hidden = !status.memory;
  if (!status.decoder) { // the run has no decoder (or its stage has not finished): say so before a prompt is typed
    noDecoder = status.no_decoder;
    for (const id of ["prompt-go", "memory-ask"]) { $(id).disabled = true; $(id).title = noDecoder; }
    showError($("prompt-error"), noDecoder);
  }
  const index = status.index;
  const box = $("index-status");
  const bar = $("index-progress");
  box.dataset.state = index.state;
  if (index.state === "building") {
    bar.hidden = false;
    bar.max = Math.max(index.total, 1);
    bar.value = index.done;
    $("index-text").textContent = `indexing the run's test manifest: ${index.done} / ${index.total} items`;
    setTimeout(pollStatus, 500);
  } else if (index.state === "ready") {
    bar.hidden = true;
    const counts = Object.entries(index.counts).map(([m, n]) => `${n} ${m}`).join(", ");
    $("index-text").textContent = `index: ${counts} (${baseName(index.source)})`;
  } else {
    bar.hidden = true;
    $("index-text").textContent = `no index: ${index.error}`;
  }
}

// The last part of a path ("idx/" → "idx": `--index idx/` showed an empty name).
function baseName(path) {
  return path.split(/[\\/]+/).filter(Boolean).pop() || path;
}

// ---- search ----------------------------------------------------------------------------------------

function hitCard(hit) {
  const card = el("figure", { className: "hit", "data-id": hit.id, "data-rank": hit.rank,
                              "data-modality": hit.modality, "data-label": hit.label || "" });
  // no `media` for a file the page cannot show (a sound in AIFF): its name stands in for it
  if (hit.media && hit.modality === "image") card.append(el("img", { src: hit.media, alt: hit.label || hit.name, loading: "lazy" }));
  else if (hit.media) card.append(el("audio", { src: hit.media, controls: true, preload: "none" }));
  else card.append(el("blockquote", { text: hit.text || hit.name || "" }));
  const where = hit.name || (hit.metadata.line !== undefined ? `line ${hit.metadata.line}` : "");
  card.append(el("figcaption", {},
    el("b", { text: `#${hit.rank} · ${hit.score.toFixed(3)}` }), ` ${hit.modality}`, el("br"),
    hit.label || "", el("br"), where));
  card.title = JSON.stringify(hit.metadata, null, 1).slice(0, 2000);
  return card;
}

async function search(pieces, event) {
  event.preventDefault();
  const form = new FormData();
  pieces.appendTo(form);
  form.append("target", $("search-target").value);
  form.append("k", $("search-k").value);
  const go = $("search-go");
  go.disabled = true;
  try {
    const out = await api("/api/search", { method: "POST", body: form });
    showError($("search-error"), null);
    const results = $("search-results");
    results.replaceChildren(...out.hits.map(hitCard));
    results.dataset.searches = String(Number(results.dataset.searches || 0) + 1);
    $("search-info").textContent = `${out.hits.length} hits for ${out.pieces} piece(s) in ${out.took_ms} ms`;
  } catch (error) {
    showError($("search-error"), error);
  } finally {
    go.disabled = false;
  }
}

// ---- prompt ----------------------------------------------------------------------------------------

function entropyColour(h) {
  const hue = 120 * (1 - Math.min(Math.max(h, 0) / MAX_ENTROPY, 1));
  return `hsl(${hue} 70% 82%)`;
}

function colourTokens() {
  const by = $("prompt-colour-by").value;
  for (const span of $("answer").querySelectorAll(".tok")) {
    const h = by === "model" ? span.dataset.model : span.dataset.entropy;
    span.style.background = h === undefined ? "transparent" : entropyColour(Number(h));
  }
}

// The values shown on hover (a CSS tooltip from data-tip, so it also shows in screenshots).
function tokenTitle(span) {
  const own = span.dataset.model === undefined ? "" : ` · model's own ${Number(span.dataset.model).toFixed(3)} nats`;
  span.dataset.tip = `entropy ${Number(span.dataset.entropy).toFixed(3)} nats${own} · log-prob ` +
                     `${Number(span.dataset.logprob).toFixed(3)} · id ${span.dataset.id}`;
  span.setAttribute("aria-label", span.dataset.tip);
}

// Read server-sent events from a fetch response: calls on(event, data) per event.
async function readEvents(response, on) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      on(event, JSON.parse(data));
    }
  }
}

let generation = null; // the AbortController of the answer being streamed
let noDecoder = null; // why this server answers no prompts (/api/status), or null

async function prompt(pieces, event) {
  event.preventDefault();
  const form = new FormData();
  pieces.appendTo(form);
  form.append("temperature", $("prompt-temperature").value);
  form.append("top_p", $("prompt-top-p").value);
  form.append("max_new_tokens", $("prompt-max-tokens").value);
  form.append("seed", $("prompt-seed").value);
  const bestOf = $("prompt-best-of").value || "1";
  form.append("best_of", bestOf);
  const answer = $("answer");
  answer.replaceChildren();
  answer.dataset.state = "streaming";
  $("answer-info").textContent = "";
  $("candidates").replaceChildren();
  showError($("prompt-error"), null);
  const spans = [];
  const addToken = (data) => {
    const span = el("span", { className: "tok", text: data.text, "data-id": data.id,
                              "data-entropy": data.entropy, "data-logprob": data.logprob });
    tokenTitle(span);
    spans.push(span);
    if (data.text) answer.append(span);
    colourTokens();
  };
  const done = (data) => {
    data.model_entropy.forEach((h, i) => { spans[i].dataset.model = h; tokenTitle(spans[i]); });
    // each token's own text: the stream releases text late while a stop string could begin, so a
    // token's span carried the next one's characters under its own entropy
    data.token_texts.forEach((text, i) => { spans[i].textContent = text; });
    answer.replaceChildren(...spans.filter((span) => span.textContent));
    colourTokens();
    answer.dataset.state = "done";
    const ended = data.context_cut ? `the decoder's ${data.context_cut}-token context (prompt + answer)`
      : data.finish_reason;
    $("answer-info").textContent = `${spans.length} tokens · ended by ${ended} · ` +
      `mean entropy ${data.mean_entropy.toFixed(3)} nats`;
  };
  generation = new AbortController();
  $("prompt-go").disabled = true;
  $("prompt-stop").disabled = false;
  try {
    if (Number(bestOf) !== 1) { // whole answers, the best shown with every candidate's scores ("01" is 1)
      const response = await fetch("/api/generate", { method: "POST", body: form, signal: generation.signal });
      const data = await response.json().catch(() => null);
      if (!response.ok) throw new Error(data && data.error ? data.error : `${response.status} ${response.statusText}`);
      data.tokens.forEach(addToken);
      done(data);
      showCandidates(data.candidates);
      return;
    }
    const response = await fetch("/api/generate/stream", { method: "POST", body: form, signal: generation.signal });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error(body && body.error ? body.error : `${response.status} ${response.statusText}`);
    }
    await readEvents(response, (kind, data) => {
      if (kind === "token") addToken(data);
      else if (kind === "done") done(data);
      else if (kind === "error") throw new Error(data.error);
    });
  } catch (error) {
    const stopped = error.name === "AbortError";
    answer.dataset.state = stopped ? "stopped" : "error";
    if (!stopped) showError($("prompt-error"), error);
  } finally {
    $("prompt-go").disabled = Boolean(noDecoder);
    $("prompt-stop").disabled = true;
    generation = null;
  }
}

// The candidates a best-of answer was chosen from, best first: score = mean log-prob + the space's judgement.
function showCandidates(candidates) {
  const rows = candidates.map((c, i) => el("tr", { className: i === 0 ? "chosen" : "" },
    el("td", { text: c.text }), el("td", { text: c.logprob.toFixed(3) }),
    el("td", { text: c.similarity === null ? "–" : c.similarity.toFixed(3) }), el("td", { text: c.score.toFixed(2) })));
  const head = el("tr", {}, ...["candidate", "mean log-prob", "cosine to the media", "score"].map((t) => el("th", { text: t })));
  $("candidates").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

// ---- memory ----------------------------------------------------------------------------------------

// The ids the last turn recalled, and whose turn it was: another user's list highlights none of
// them (it said "highlighted: recalled by the last turn" over a list that had nothing of that turn).
let recalled = { user: "", ids: new Set() };

function wasRecalled(id) {
  return recalled.user === listedUser && recalled.ids.has(id);
}

// What a card says in place of a picture or sound whose bytes the page cannot show (`media` null:
// a sound in AIFF, a file stored as a path); the card was empty, or looked like a text item.
const UNSHOWN = { image: "this picture cannot be shown in the browser",
                  audio: "this sound cannot be played in the browser" };

function memoryUser() {
  const user = $("memory-user").value.trim();
  localStorage.setItem("mmembed-user", user);
  return user;
}

function itemCard(item) {
  const card = el("figure", { className: "item", "data-id": item.id, "data-modality": item.modality });
  if (wasRecalled(item.id)) card.classList.add("recalled");
  if (item.media && item.modality === "image") card.append(el("img", { src: item.media, alt: item.text || "" }));
  else if (item.media) card.append(el("audio", { src: item.media, controls: true, preload: "none" }));
  else if (item.modality !== "text") {
    card.append(el("p", { className: "unplayable", text: UNSHOWN[item.modality] ?? `this ${item.modality} cannot be shown in the browser` }));
  }
  if (item.modality === "text" || item.text) card.append(el("blockquote", { text: item.text || "" }));
  const when = new Date(item.time * 1000).toLocaleString();
  card.append(el("figcaption", {}, el("b", { text: `#${item.id}` }),
    ` ${item.modality} · ${item.role} · turn ${item.turn ?? "–"}`, wasRecalled(item.id) ? " · recalled" : "", el("br"), when));
  const forget = el("button", { type: "button", className: "forget", text: "Forget" });
  forget.addEventListener("click", () => {
    if (!window.confirm(`Forget item #${item.id} of ${listedUser}?`)) return;
    forget.disabled = true; // a second click deleted nothing and reported an error
    forgetItem(item.id).finally(() => { forget.disabled = false; }); // a failed delete can be tried again
  });
  card.append(forget);
  return card;
}

let listedUser = ""; // whose items the list shows: Forget deletes under that name, not the box's new one
let memoryRefreshes = 0; // the latest refresh's number: an older, slower answer drew the previous user's list

async function refreshMemory() {
  const user = memoryUser();
  if ($("tab-memory").hidden) return;
  const mine = ++memoryRefreshes;
  if (!user) { // an emptied box: no one's list stays on screen
    listedUser = "";
    $("memory-answer").hidden = true;
    showError($("memory-error"), null);
    $("memory-items").replaceChildren();
    $("memory-info").textContent = "";
    return;
  }
  try {
    const out = await api(`/api/memory?user=${encodeURIComponent(user)}`);
    if (mine !== memoryRefreshes) return;
    showError($("memory-error"), null); // an earlier failure's message stayed under the list it no longer describes
    listedUser = out.user;
    $("memory-answer").hidden = recalled.user !== listedUser; // the last turn's answer is its user's only
    const items = $("memory-items");
    items.replaceChildren(...out.items.map(itemCard));
    items.dataset.refreshes = String(Number(items.dataset.refreshes || 0) + 1);
    const shown = out.items.length < out.count ? ` (the newest ${out.items.length} shown)` : "";
    $("memory-info").textContent = `${out.count} item(s) remembered for ${out.user}${shown}` +
      (out.items.some((item) => wasRecalled(item.id)) ? ` · highlighted: recalled by the last turn` : "");
  } catch (error) {
    if (mine === memoryRefreshes) showError($("memory-error"), error);
  }
}

async function forgetItem(id) {
  try {
    await api(`/api/memory/items/${id}?user=${encodeURIComponent(listedUser)}`, { method: "DELETE" });
    recalled.ids.delete(id);
    showError($("memory-error"), null);
    await refreshMemory();
  } catch (error) {
    showError($("memory-error"), error);
  }
}

async function memoryTurn(pieces, path) {
  const form = new FormData();
  form.append("user", memoryUser());
  const sent = pieces.snapshot();
  pieces.appendTo(form);
  const buttons = [$("memory-ask"), $("memory-remember")]; // both: one turn at a time (its pieces were sent twice)
  if ($("memory-remember").disabled) return; // a turn is under way (Ask alone is off on a run without a decoder)
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const out = await api(`/api/memory/${path}`, { method: "POST", body: form });
    showError($("memory-error"), null);
    if (path === "ask") {
      recalled = { user: out.user, ids: new Set(out.recalled.map((h) => h.id)) };
      const scores = out.recalled.map((h) => `#${h.id} (${h.score.toFixed(3)})`).join(", ") || "nothing";
      $("memory-answer").textContent = `${out.text || "(no answer)"}\n— turn ${out.turn}; recalled: ${scores}`;
    } else {
      recalled = { user: out.user, ids: new Set() };
      $("memory-answer").textContent = `remembered ${out.ids.length} item(s)`;
    }
    pieces.removeSent(sent);
    await refreshMemory();
  } catch (error) {
    showError($("memory-error"), error);
  } finally {
    buttons.forEach((b) => { b.disabled = b.id === "memory-ask" && Boolean(noDecoder); });
  }
}

// ---- start -----------------------------------------------------------------------------------------

function start() {
  const searchPieces = wireBuilder("search", { weights: true, reorder: false });
  const promptPieces = wireBuilder("prompt", { weights: false, reorder: true });
  const memoryPieces = wireBuilder("memory", { weights: false, reorder: true });
  $("search-form").addEventListener("submit", (e) => search(searchPieces, e));
  $("prompt-form").addEventListener("submit", (e) => prompt(promptPieces, e));
  $("prompt-stop").addEventListener("click", () => generation && generation.abort());
  $("prompt-colour-by").addEventListener("change", colourTokens);
  $("memory-form").addEventListener("submit", (e) => { e.preventDefault(); memoryTurn(memoryPieces, "ask"); });
  $("memory-remember").addEventListener("click", () => memoryTurn(memoryPieces, "remember"));
  $("memory-refresh").addEventListener("click", refreshMemory);
  $("memory-user").addEventListener("keydown", (e) => { // Enter submitted the form: an "Ask" under the new name
    if (e.key !== "Enter" || e.isComposing) return;
    e.preventDefault();
    refreshMemory();
  });
  $("memory-user").value = localStorage.getItem("mmembed-user") || "guest";
  for (const tab of document.querySelectorAll("nav button")) {
    tab.addEventListener("click", () => { history.replaceState(null, "", `#${tab.dataset.view}`); showView(tab.dataset.view); });
  }
  pollStatus().then(() => showView(["search", "prompt", "memory"].includes(location.hash.slice(1)) ?
    location.hash.slice(1) : "search"));
}

document.addEventListener("DOMContentLoaded", start);
