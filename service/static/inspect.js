// kvserve attention inspector: plain JS + canvas, no dependencies, works offline.
// Data flow: one /v1/attention call for the token list, entropies and layer x head thumbnails; then one call
// per opened layer for its full weights, and /v1/logit_lens for a window of positions around the focus.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const HEATMAP_PX = 380;
  const LENS_COLUMNS = 12;
  const MASKED = [233, 236, 240];
  const STOPS = [[255, 255, 255], [222, 235, 247], [158, 202, 225], [66, 146, 198], [8, 81, 156], [8, 29, 88]];

  const S = {
    summary: null, info: null, tokens: [], ids: [], numPrompt: 0,
    layers: new Map(), // layer -> {heads: [Float32Array T*T], mean, max, raw}
    pending: new Map(), // layer -> Promise
    lens: new Map(), // position -> [layer] -> [{id, text, prob}]
    lensRaw: [],
    layer: 0, head: "0", pinned: null, hover: null, generation: 0,
  };

  // ---- colours --------------------------------------------------------------------------------
  const LUT = Array.from({length: 256}, (_, i) => {
    const x = Math.sqrt(i / 255) * (STOPS.length - 1); // sqrt: small weights stay visible
    const j = Math.min(Math.floor(x), STOPS.length - 2), f = x - j;
    return STOPS[j].map((c, n) => Math.round(c + (STOPS[j + 1][n] - c) * f));
  });
  const colour = (w) => LUT[Math.max(0, Math.min(255, Math.round(w * 255)))];
  const css = (rgb) => `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;

  // ---- helpers --------------------------------------------------------------------------------
  function setStatus(state, text) {
    const el = $("status");
    el.dataset.state = state;
    el.textContent = text;
  }

  function shown(text) {
    if (text === "") return "∅";
    if (!text.trim()) return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "→"); // whitespace-only: make it visible
    return text.replace(/\n/g, "↵").replace(/\t/g, "→");
  }

  const tokenLabel = (i) => `${i}:“${shown(S.tokens[i].text)}”`;

  async function api(path, body) {
    const headers = {"Content-Type": "application/json"};
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    const res = await fetch(path, {method: "POST", headers, body: JSON.stringify(body)});
    const text = await res.text();
    let data;
    try { data = JSON.parse(text); } catch { throw new Error(`HTTP ${res.status}: ${text.slice(0, 200)}`); }
    if (!res.ok) throw new Error(`HTTP ${res.status}: ${data.error ? data.error.message : text.slice(0, 200)}`);
    return data;
  }

  // ---- running an inspection ------------------------------------------------------------------
  async function inspect() {
    const text = $("prompt").value;
    if (!text.trim()) { setStatus("error", "The prompt is empty."); return; }
    const input = $("as-chat").checked ? {messages: [{role: "user", content: text}]} : {prompt: text};
    const maxTokens = Math.max(0, parseInt($("max-tokens").value || "0", 10));
    const generation = ++S.generation;
    $("run").disabled = true;
    setStatus("busy", maxTokens ? `Generating ${maxTokens} tokens and running the model…` : "Running the model…");
    try {
      const summary = await api("/v1/attention", {...input, max_tokens: maxTokens, include_weights: false,
        top_k: 0, thumbnail_size: 32, precision: 3});
      if (generation !== S.generation) return;
      Object.assign(S, {summary, info: summary.model_info, tokens: summary.tokens, numPrompt: summary.num_prompt_tokens,
        ids: summary.tokens.map((t) => t.id), pinned: null, hover: null, lensRaw: []});
      S.layers.clear(); S.pending.clear(); S.lens.clear();
      S.layer = Math.min(S.layer, S.info.layers - 1);
      if (!S.head.match(/^(mean|max)$/) && Number(S.head) >= S.info.heads) S.head = "0";
      $("model-info").textContent = `${summary.model} · ${S.info.arch} · ${S.info.layers} layers · ` +
        `${S.info.heads} heads (${S.info.kv_heads} KV)`;
      fillPickers();
      renderStrip();
      drawGrid();
      setStatus("busy", `Loading layer ${S.layer}…`);
      await openLayer(S.layer);
      setStatus("busy", "Running the logit lens…");
      await showLens(S.ids.length - 1);
      const generated = S.ids.length - S.numPrompt;
      setStatus("ready", `${S.ids.length} tokens (${S.numPrompt} prompt${generated ? `, ${generated} generated` : ""}). ` +
        "Hover tokens or the heatmap; click a token to pin it and move the logit-lens window.");
      $("download").disabled = false;
    } catch (err) {
      setStatus("error", err.message);
    } finally {
      $("run").disabled = false;
    }
  }

  function loadLayer(layer) {
    if (S.layers.has(layer)) return Promise.resolve(S.layers.get(layer));
    if (S.pending.has(layer)) return S.pending.get(layer);
    const generation = S.generation;
    const job = api("/v1/attention", {prompt: S.ids, layers: [layer], heads: "all", top_k: 0, precision: 3})
      .then((raw) => {
        const n = S.ids.length;
        const heads = raw.attention[0].map((rows) => {
          const m = new Float32Array(n * n);
          rows.forEach((row, q) => m.set(row, q * n));
          return m;
        });
        raw.attention = null; // the Float32Arrays hold it now; the download rebuilds the lists
        const data = {heads, mean: null, max: null, raw};
        if (generation === S.generation) S.layers.set(layer, data);
        return data;
      })
      .finally(() => S.pending.delete(layer));
    S.pending.set(layer, job);
    return job;
  }

  async function openLayer(layer) {
    S.layer = layer;
    $("layer").value = String(layer);
    drawGrid();
    drawHeatmap();
    try {
      await loadLayer(layer);
    } catch (err) {
      setStatus("error", err.message);
      return;
    }
    if (S.layer === layer) { drawHeatmap(); updateFocus(); }
  }

  function matrix(layer, head) {
    const data = S.layers.get(layer);
    if (!data) return null;
    if (head !== "mean" && head !== "max") return data.heads[Number(head)];
    if (!data[head]) {
      const out = new Float32Array(data.heads[0].length);
      for (const m of data.heads) {
        for (let i = 0; i < m.length; i++) out[i] = head === "mean" ? out[i] + m[i] / data.heads.length : Math.max(out[i], m[i]);
      }
      data[head] = out;
    }
    return data[head];
  }

  // ---- pickers --------------------------------------------------------------------------------
  function fillPickers() {
    const layer = $("layer"), head = $("head");
    layer.replaceChildren(...Array.from({length: S.info.layers}, (_, i) => new Option(String(i), String(i))));
    const heads = Array.from({length: S.info.heads}, (_, i) => new Option(String(i), String(i)));
    head.replaceChildren(...heads, new Option("mean of all", "mean"), new Option("max of all", "max"));
    layer.value = String(S.layer);
    head.value = S.head;
  }

  // ---- token strip ----------------------------------------------------------------------------
  function renderStrip() {
    const strip = $("strip");
    strip.replaceChildren(...S.tokens.map((t, i) => {
      const el = document.createElement("span");
      el.className = "tok" + (i >= S.numPrompt ? " generated" : "") + (/^<\|.*\|>$|^<\/?s>$/.test(t.text) ? " special" : "");
      el.textContent = shown(t.text);
      el.dataset.index = String(i);
      el.title = `#${i} · id ${t.id}${i >= S.numPrompt ? " · generated" : ""}`;
      return el;
    }));
  }

  function focusIndex() {
    return S.hover ?? S.pinned;
  }

  function updateFocus() {
    const q = focusIndex();
    const m = matrix(S.layer, S.head);
    const n = S.ids.length;
    const chips = $("strip").children;
    for (let k = 0; k < chips.length; k++) {
      const el = chips[k];
      el.classList.toggle("query", k === q);
      el.classList.toggle("pinned", k === S.pinned);
      el.classList.toggle("after", q !== null && k > q);
      const w = q !== null && m && k <= q ? m[q * n + k] : 0;
      el.classList.toggle("attended", w >= 0.02);
      el.style.background = w > 0 ? css(colour(w)) : "";
      el.style.color = w > 0.3 ? "#fff" : "";
    }
    const info = $("focus-info");
    if (q === null || !m) { info.textContent = ""; drawHeatmap(); return; }
    const row = Array.from(m.subarray(q * n, q * n + q + 1), (w, k) => [k, w]).sort((a, b) => b[1] - a[1]).slice(0, 4);
    info.textContent = `layer ${S.layer}, head ${S.head}: ${tokenLabel(q)} attends to ` +
      row.map(([k, w]) => `${tokenLabel(k)} ${w.toFixed(2)}`).join(", ");
    drawHeatmap();
    highlightLensColumn(q);
  }

  // ---- heatmap --------------------------------------------------------------------------------
  function heatGeometry() {
    const n = S.ids.length, labels = n <= 28; // token labels on the axes while they stay legible
    const margin = labels ? 78 : 0;
    return {n, labels, x0: margin, size: HEATMAP_PX - margin, cell: (HEATMAP_PX - margin) / Math.max(n, 1)};
  }

  function drawHeatmap() {
    const canvas = $("heatmap"), ctx = canvas.getContext("2d");
    const g = heatGeometry(), n = g.n;
    $("heatmap-title").textContent = n ? `Layer ${S.layer}, head ${S.head}` : "Attention";
    const m = n ? matrix(S.layer, S.head) : null;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    delete canvas.dataset.drawn;
    if (!m) {
      if (n) { ctx.fillStyle = "#6b7482"; ctx.font = "13px sans-serif"; ctx.fillText("loading…", 12, 24); }
      return;
    }
    const image = new ImageData(n, n);
    const stretch = $("stretch").checked;
    for (let q = 0; q < n; q++) {
      let top = 1;
      if (stretch) { top = 1e-6; for (let k = 0; k <= q; k++) top = Math.max(top, m[q * n + k]); }
      for (let k = 0; k < n; k++) {
        const rgb = k > q ? MASKED : colour(m[q * n + k] / top);
        const o = (q * n + k) * 4;
        image.data[o] = rgb[0]; image.data[o + 1] = rgb[1]; image.data[o + 2] = rgb[2]; image.data[o + 3] = 255;
      }
    }
    const off = new OffscreenCanvas(n, n);
    off.getContext("2d").putImageData(image, 0, 0);
    // Enlarging: sharp cells. Shrinking (long prompts): smooth, so thin lines average in rather than vanish.
    ctx.imageSmoothingEnabled = n > g.size;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(off, g.x0, 0, g.size, g.size);
    const q = focusIndex();
    if (g.labels) {
      const font = Math.min(12, Math.max(8, g.cell * 0.8));
      ctx.font = `${font}px ui-monospace, monospace`;
      for (let i = 0; i < n; i++) {
        const label = shown(S.tokens[i].text).slice(0, 9);
        ctx.fillStyle = i === q ? "#d03b2e" : "#3a4350";
        ctx.textAlign = "right"; ctx.textBaseline = "middle";
        ctx.fillText(label, g.x0 - 4, (i + 0.5) * g.cell);
        ctx.save();
        ctx.translate(g.x0 + (i + 0.5) * g.cell, g.size + 4);
        ctx.rotate(-Math.PI / 3);
        ctx.fillText(label, 0, 0);
        ctx.restore();
      }
    }
    if (q !== null) {
      ctx.strokeStyle = "#d03b2e";
      ctx.lineWidth = 2;
      ctx.strokeRect(g.x0 + 1, q * g.cell + 1, Math.max((q + 1) * g.cell - 2, 2), Math.max(g.cell - 2, 2));
    }
    canvas.dataset.drawn = `${S.layer}/${S.head}/${n}`;
  }

  function heatmapCell(event) {
    const canvas = $("heatmap"), rect = canvas.getBoundingClientRect(), g = heatGeometry();
    const x = (event.clientX - rect.left) * canvas.width / rect.width - g.x0;
    const y = (event.clientY - rect.top) * canvas.height / rect.height;
    const q = Math.floor(y / g.cell), k = Math.floor(x / g.cell);
    return x >= 0 && q >= 0 && q < g.n && k >= 0 && k < g.n ? [q, k] : null;
  }

  // ---- layer x head grid ----------------------------------------------------------------------
  function gridGeometry() {
    const layers = S.info.layers, heads = S.info.heads;
    const width = $("grid").parentElement.clientWidth - 24;
    const cell = Math.max(8, Math.min(40, Math.floor((width - 30) / layers) - 2));
    return {layers, heads, cell, left: 30, top: 14, pitch: cell + 2};
  }

  function drawGrid() {
    const canvas = $("grid");
    if (!S.summary) return;
    const g = gridGeometry();
    canvas.width = g.left + g.layers * g.pitch;
    canvas.height = g.top + g.heads * g.pitch;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#5a6472"; ctx.font = "10px sans-serif"; ctx.textBaseline = "middle";
    for (let h = 0; h < g.heads; h++) ctx.fillText(`h${h}`, 2, g.top + h * g.pitch + g.cell / 2);
    ctx.textAlign = "center";
    for (let l = 0; l < g.layers; l += g.cell < 14 ? 5 : 1) ctx.fillText(`${l}`, g.left + l * g.pitch + g.cell / 2, 6);
    ctx.imageSmoothingEnabled = false;
    const thumbs = S.summary.thumbnails;
    for (let l = 0; l < g.layers; l++) {
      for (let h = 0; h < g.heads; h++) {
        const t = thumbs[l][h], size = t.length;
        const image = ctx.createImageData(size, size);
        for (let q = 0; q < size; q++) {
          for (let k = 0; k < size; k++) {
            const rgb = colour(t[q][k]), o = (q * size + k) * 4;
            image.data[o] = rgb[0]; image.data[o + 1] = rgb[1]; image.data[o + 2] = rgb[2]; image.data[o + 3] = 255;
          }
        }
        const off = new OffscreenCanvas(size, size);
        off.getContext("2d").putImageData(image, 0, 0);
        ctx.drawImage(off, g.left + l * g.pitch, g.top + h * g.pitch, g.cell, g.cell);
      }
    }
    ctx.strokeStyle = "#d03b2e"; ctx.lineWidth = 2;
    const x = g.left + S.layer * g.pitch - 1;
    if (S.head === "mean" || S.head === "max") ctx.strokeRect(x, g.top - 1, g.pitch, g.heads * g.pitch);
    else ctx.strokeRect(x, g.top + Number(S.head) * g.pitch - 1, g.pitch, g.pitch);
  }

  function gridCell(event) {
    if (!S.summary) return null;
    const g = gridGeometry(), canvas = $("grid"), rect = canvas.getBoundingClientRect();
    const x = (event.clientX - rect.left) * canvas.width / rect.width - g.left;
    const y = (event.clientY - rect.top) * canvas.height / rect.height - g.top;
    const l = Math.floor(x / g.pitch), h = Math.floor(y / g.pitch);
    return l >= 0 && l < g.layers && h >= 0 && h < g.heads ? [l, h] : null;
  }

  // ---- logit lens -----------------------------------------------------------------------------
  function lensWindow(pos) {
    const n = S.ids.length;
    const end = Math.min(n, Math.max(pos + 3, LENS_COLUMNS));
    return [Math.max(0, end - LENS_COLUMNS), end];
  }

  async function showLens(pos) {
    const [a, b] = lensWindow(pos);
    const missing = [];
    for (let p = a; p < b; p++) if (!S.lens.has(p)) missing.push(p);
    if (missing.length) {
      const generation = S.generation;
      const from = Math.max(0, missing[0] - 12), to = Math.min(S.ids.length, Math.max(missing[missing.length - 1] + 1, from + 32));
      const raw = await api("/v1/logit_lens", {prompt: S.ids, positions: `${from}:${to}`, top_k: 5, precision: 3});
      if (generation !== S.generation) return;
      raw.positions.forEach((p, i) => S.lens.set(p, raw.predictions.map((perLayer) => perLayer[i])));
      S.lensRaw.push(raw);
    }
    renderLens(a, b, pos);
  }

  function renderLens(a, b, sel) {
    const table = $("lens"), layers = S.info.layers;
    const head = document.createElement("tr");
    head.append(Object.assign(document.createElement("th"), {className: "row", textContent: "input →"}));
    for (let p = a; p < b; p++) {
      head.append(Object.assign(document.createElement("th"), {textContent: shown(S.tokens[p].text), title: `position ${p}`,
        className: p === sel ? "sel" : ""}));
    }
    const rows = [];
    for (let l = layers - 1; l >= 0; l--) {
      const tr = document.createElement("tr");
      tr.append(Object.assign(document.createElement("th"), {className: "row", textContent: l === layers - 1 ? `L${l} out` : `L${l}`}));
      for (let p = a; p < b; p++) {
        const top = S.lens.get(p)[l];
        const td = document.createElement("td");
        td.textContent = shown(top[0].text);
        td.title = `layer ${l}, after ${tokenLabel(p)}\n` + top.map((t) => `${t.prob.toFixed(3)}  “${shown(t.text)}”`).join("\n");
        td.style.background = `rgba(31, 95, 191, ${(0.85 * top[0].prob).toFixed(3)})`;
        if (top[0].prob > 0.5) td.style.color = "#fff";
        if (p + 1 < S.ids.length && top[0].id === S.ids[p + 1]) td.classList.add("hit");
        td.dataset.position = String(p);
        if (p === sel) td.classList.add("sel");
        tr.append(td);
      }
      rows.push(tr);
    }
    const foot = document.createElement("tr");
    foot.append(Object.assign(document.createElement("th"), {className: "row", textContent: "actual next"}));
    for (let p = a; p < b; p++) foot.append(Object.assign(document.createElement("td"), {textContent: p + 1 < S.ids.length ? shown(S.tokens[p + 1].text) : "—"}));
    table.tHead.replaceChildren(head);
    table.tBodies[0].replaceChildren(...rows);
    table.tFoot.replaceChildren(foot);
    table.dataset.window = `${a}:${b}`;
  }

  function highlightLensColumn(q) {
    for (const el of $("lens").querySelectorAll("td[data-position]")) el.classList.toggle("sel", Number(el.dataset.position) === q);
  }

  // ---- download -------------------------------------------------------------------------------
  function download() {
    const n = S.ids.length;
    const layers = {};
    for (const [layer, data] of S.layers) {
      layers[layer] = {...data.raw, attention: [data.heads.map((m) => Array.from({length: n}, (_, q) =>
        Array.from(m.subarray(q * n, (q + 1) * n), (w) => Math.round(w * 1000) / 1000)))]};
    }
    const blob = new Blob([JSON.stringify({summary: S.summary, layers, logit_lens: S.lensRaw})], {type: "application/json"});
    const a = Object.assign(document.createElement("a"), {href: URL.createObjectURL(blob), download: "kvserve-inspection.json"});
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  // ---- events ---------------------------------------------------------------------------------
  function wire() {
    const key = $("api-key");
    key.value = localStorage.getItem("kvserve-api-key") || "";
    key.addEventListener("change", () => localStorage.setItem("kvserve-api-key", key.value.trim()));
    $("run").addEventListener("click", inspect);
    $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) inspect(); });
    $("download").addEventListener("click", download);
    $("layer").addEventListener("change", (e) => openLayer(Number(e.target.value)));
    $("layer-prev").addEventListener("click", () => S.info && S.layer > 0 && openLayer(S.layer - 1));
    $("layer-next").addEventListener("click", () => S.info && S.layer < S.info.layers - 1 && openLayer(S.layer + 1));
    $("stretch").addEventListener("change", drawHeatmap);
    $("head").addEventListener("change", (e) => { S.head = e.target.value; drawGrid(); drawHeatmap(); updateFocus(); });

    const strip = $("strip");
    strip.addEventListener("mouseover", (e) => {
      const el = e.target.closest(".tok");
      if (el) { S.hover = Number(el.dataset.index); updateFocus(); }
    });
    strip.addEventListener("mouseleave", () => { S.hover = null; updateFocus(); });
    strip.addEventListener("click", (e) => {
      const el = e.target.closest(".tok");
      if (!el) return;
      const i = Number(el.dataset.index);
      S.pinned = S.pinned === i ? null : i;
      updateFocus();
      showLens(S.pinned ?? S.ids.length - 1).catch((err) => setStatus("error", err.message));
    });

    const heatmap = $("heatmap");
    heatmap.addEventListener("mousemove", (e) => {
      const cell = heatmapCell(e), m = matrix(S.layer, S.head);
      if (!cell || !m) return;
      const [q, k] = cell;
      $("heatmap-hover").textContent = k > q ? `${tokenLabel(q)} cannot see the later ${tokenLabel(k)}`
        : `${tokenLabel(q)} → ${tokenLabel(k)}: ${m[q * S.ids.length + k].toFixed(3)}`;
      if (S.hover !== q) { S.hover = q; updateFocus(); }
    });
    heatmap.addEventListener("mouseleave", () => { $("heatmap-hover").textContent = ""; S.hover = null; updateFocus(); });

    const grid = $("grid");
    grid.addEventListener("mousemove", (e) => {
      const cell = gridCell(e);
      $("grid-hover").textContent = cell ? `layer ${cell[0]}, head ${cell[1]}: mean entropy ` +
        `${S.summary.entropy[cell[0]][cell[1]].toFixed(2)} nats` : "";
    });
    grid.addEventListener("click", (e) => {
      const cell = gridCell(e);
      if (!cell) return;
      S.head = String(cell[1]);
      $("head").value = S.head;
      openLayer(cell[0]);
    });
    window.addEventListener("resize", drawGrid);
    drawLegend();
  }

  function drawLegend() {
    const canvas = $("legend"), ctx = canvas.getContext("2d");
    for (let x = 0; x < canvas.width; x++) { ctx.fillStyle = css(colour(x / (canvas.width - 1))); ctx.fillRect(x, 0, 1, canvas.height); }
  }

  wire();
})();
